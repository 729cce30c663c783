"""A random-direction control for a refusal direction: same layer, position and norm, seeded Gaussian direction.

    python scripts/random_direction.py results/safe/direction --seed 0 --out results/safe/random-0

``refusal-lens evaluate --direction results/safe/random-0`` then gives the control rows (ablation of, and addition
along, a direction that has nothing to do with refusal) beside the real direction's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from refusal_lens.direction.compute import Direction


def random_like(direction: Direction, seed: int) -> Direction:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(direction.vector.shape, generator=gen, dtype=torch.float64)
    v = v / v.norm() * direction.vector.double().norm()
    meta = {k: v for k, v in direction.meta.items() if k in ("model", "layer", "position")}
    meta["control"] = {"kind": "random direction of equal norm", "seed": seed}
    return Direction(v.float(), direction.layer, direction.position, None, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("direction", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    control = random_like(Direction.load(args.direction), args.seed)
    print(control.save(args.out), "norm", float(control.vector.norm()))


if __name__ == "__main__":
    main()
