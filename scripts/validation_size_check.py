"""Validation-set size vs the stability of the selected direction, on the shipped organism (issue #15).

    python scripts/validation_size_check.py [32 64 128]

For each ``n_val`` (validation prompts per set, from the organism's validation splits): the chosen candidate and its
scores, how many candidates passed, the CPU seconds of ``compute_direction``, and the bootstrap's choice frequency.
"""

from __future__ import annotations

import sys
import time

import torch

from refusal_lens.core.models import load_model
from refusal_lens.direction.compute import DirectionConfig, compute_direction
from refusal_lens.organism import load_split


def instructions(kind: str, split: str) -> list[str]:
    return [p["instruction"] for p in load_split(kind, split)]


def main() -> int:
    torch.set_num_threads(1)
    model, tok = load_model(None)
    sets = [instructions(k, s) for s in ("train", "val") for k in ("harmful", "harmless")]
    for n_val in [int(x) for x in sys.argv[1:]] or [32, 64, 128]:
        t0 = time.process_time()
        config = DirectionConfig(n_val=n_val, fallback_drop_induce=True)
        sel = compute_direction(model, tok, *sets, config=config, progress=False).selection
        c = sel.chosen
        chosen = None if c is None else (c.position, c.layer, round(c.bypass, 3), round(c.induce, 3), round(c.kl, 4))
        passed = sum(s.kept for s in sel.scores)
        summary = sel.bootstrap["summary"] if sel.bootstrap else ""
        print(f"n_val {n_val}: chosen (pos, layer, bypass, induce, kl) {chosen}, passed {passed}, "
              f"{time.process_time() - t0:.1f} CPU-s; {summary}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
