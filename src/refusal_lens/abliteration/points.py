"""A candidate abliteration: a direction and a strength per layer for attention and MLP writes, given as two
layer kernels (the coordinate search) or as free per-layer strengths (the gradient search)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..direction.strengths import AblationPlan
from ..direction.variants import DirectionSet


@dataclass(frozen=True)
class Kernel:
    """Strength over layers: ``max_weight`` at ``peak``, falling linearly to ``min_weight`` at distance ``width``,
    zero beyond."""

    max_weight: float = 1.0
    peak: float = 0.0
    width: float = 1e9
    min_weight: float = 1.0

    def weights(self, n_layers: int) -> torch.Tensor:
        dist = (torch.arange(n_layers, dtype=torch.float64) - self.peak).abs()
        frac = (dist / max(self.width, 1e-9)).clamp(max=1.0)
        w = self.max_weight + (self.min_weight - self.max_weight) * frac
        return torch.where(dist <= self.width, w, torch.zeros_like(w))


OFF = Kernel(0.0, 0.0, 0.0, 0.0)
MAX_STRENGTH = 1.5
"""The largest strength any search gives a layer's write (1 removes the direction's component; a little more
can help where later layers write it back)."""


@dataclass(frozen=True)
class Point:
    """One candidate abliteration: the direction and the two kernels, or (``attn_w``/``mlp_w``, found by the
    gradient search) one free strength per layer, which then replaces the kernel."""

    index: float
    scope: str = "global"  # "global" or "per_layer"
    projected: bool = False
    attn: Kernel = Kernel()
    mlp: Kernel = Kernel()
    embed: float = 0.0
    attn_w: tuple[float, ...] | None = None
    mlp_w: tuple[float, ...] | None = None

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        # free strengths are left out when absent, so kernel points keep the keys older checkpoints have
        plain = {k: v for k, v in asdict(self).items() if v is not None}
        return json.loads(json.dumps(plain), parse_float=lambda s: round(float(s), 6))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Point:
        free = {k: tuple(obj[k]) for k in ("attn_w", "mlp_w") if obj.get(k) is not None}
        return cls(**{**obj, "attn": Kernel(**obj["attn"]), "mlp": Kernel(**obj["mlp"]), **free})

    def strengths(self, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attn.weights(n_layers) if self.attn_w is None else torch.tensor(self.attn_w, dtype=torch.float64)
        mlp = self.mlp.weights(n_layers) if self.mlp_w is None else torch.tensor(self.mlp_w, dtype=torch.float64)
        return attn, mlp

    def same_direction(self, other: Point) -> bool:
        return (self.index, self.scope, self.projected, self.embed) == (
            other.index, other.scope, other.projected, other.embed)  # fmt: skip

    def plan(self, directions: DirectionSet) -> AblationPlan:
        dirs, embed_dir = directions.plan_directions(self.index, self.scope, self.projected)
        attn, mlp = self.strengths(directions.n_layers)
        return AblationPlan(dirs, attn, mlp, embed_dir, self.embed)


def uniform(point: Point, strength: float, n_layers: int) -> Point:
    """``point``'s direction with one strength on every layer and write."""
    kernel = Kernel(strength, (n_layers - 1) / 2, float(n_layers), strength)
    return replace(point, attn=kernel, mlp=kernel)


def scaled(point: Point, factor: float) -> Point:
    """``point`` with both kernels' strengths multiplied by ``factor`` (rounded as checkpoints store them)."""

    def scale(k: Kernel) -> Kernel:
        return replace(k, max_weight=round(k.max_weight * factor, 6), min_weight=round(k.min_weight * factor, 6))

    return replace(point, attn=scale(point.attn), mlp=scale(point.mlp))
