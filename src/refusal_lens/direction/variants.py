"""Direction variants for abliteration (docs/abliteration.md has the math and its sources).

* per-layer difference in means ``r_s`` at the last prompt token, for every residual slot ``s`` (``resid_pre``
  of layer ``s`` for ``s < L``, the final residual for ``s = L``);
* a *fractional direction index* ``i``: the unit vectors of ``r_⌊i⌋`` and ``r_⌈i⌉`` interpolated linearly and
  renormalised;
* *projected*: the component along the normalised harmless mean of the same slot removed, renormalised;
* the paper's single selected direction (:class:`~refusal_lens.direction.compute.Direction`) as a global one.

Example:
    >>> ds = DirectionSet.from_prompts(model, fmt, harmful, harmless)  # doctest: +SKIP
    >>> u = ds.unit(4.5, projected=True)                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError
from ..core.io import load_safetensors
from ..core.prompts import ChatFormatter
from .activations import mean_activations

_TINY = 1e-12


def normalise(v: torch.Tensor) -> torch.Tensor:
    """Unit vector(s) along the last axis in float64; a (near-)zero vector stays zero instead of becoming NaN."""
    v = v.double()
    n = v.norm(dim=-1, keepdim=True)
    return torch.where(n > _TINY, v / n.clamp_min(_TINY), torch.zeros_like(v))


def interpolate(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Unit direction at a fractional ``index`` into ``directions [S, d]``: lerp of the two unit neighbours.

    The neighbours are normalised before the lerp because raw norms grow with depth: otherwise the deeper
    one would dominate and the fraction would not mean "how far between the two layers".
    """
    n = directions.shape[0]
    if not (0 <= index <= n - 1) or math.isnan(index):
        raise UserError(f"direction index {index} is out of range; use a number in 0..{n - 1}.")
    lo, hi = math.floor(index), math.ceil(index)
    frac = index - lo
    units = normalise(directions[[lo, hi]])
    return normalise((1 - frac) * units[0] + frac * units[1])


def project_off(direction: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``r̂ − (r̂·μ̂) μ̂``, renormalised: the direction without its component along the (harmless) mean ``μ``."""
    r, mu = normalise(direction), normalise(mean)
    return normalise(r - (r * mu).sum(-1, keepdim=True) * mu)


@dataclass
class DirectionSet:
    """Per-slot difference-in-means directions and the harmless means they may be projected against."""

    raw: torch.Tensor  # [L + 1, d] float64: mean harmful − mean harmless at the last prompt token, per slot
    harmless_mean: torch.Tensor  # [L + 1, d] float64

    @property
    def n_layers(self) -> int:
        return self.raw.shape[0] - 1

    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls,
        model: nn.Module,
        formatter: ChatFormatter,
        harmful: Sequence[str],
        harmless: Sequence[str],
        batch_size: int = 32,
        progress: bool = False,
    ) -> DirectionSet:
        """Means at the last prompt token of every residual slot, one forward pass per batch."""
        if not harmful or not harmless:
            raise UserError("direction variants need at least one harmful and one harmless prompt.")
        mh = mean_activations(model, formatter, harmful, 1, batch_size, "harmful", progress)[0]
        ml = mean_activations(model, formatter, harmless, 1, batch_size, "harmless", progress)[0]
        return cls(mh - ml, ml)

    def unit(self, index: float, projected: bool = False) -> torch.Tensor:
        """The global unit direction at a (fractional) slot index in ``0..L``."""
        u = interpolate(self.raw, index)
        if projected:
            u = project_off(u, interpolate(self.harmless_mean, index))
        return u

    def write_units(self, projected: bool = False) -> torch.Tensor:
        """``[L, d]``: for the writes of layer ``l``, the unit direction of the slot they land in (``l + 1``)."""
        units = normalise(self.raw[1:])
        if projected:
            units = project_off(units, self.harmless_mean[1:])
        return units

    def plan_directions(self, index: float, scope: str, projected: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(directions [L, d], embedding direction [d])`` for a scope: "global" uses the direction at
        ``index`` everywhere; "per_layer" uses each layer's own (the embedding, whose last-token difference is
        zero, keeps the global one)."""
        u = self.unit(index, projected)
        if scope == "global":
            return u.expand(self.n_layers, -1).clone(), u
        if scope == "per_layer":
            return self.write_units(projected), u
        raise UserError(f"direction scope {scope!r} is unknown; use global or per_layer.")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionSet:
        """Read ``directions.safetensors`` written by ``refusal-lens abliterate``."""
        tensors = load_safetensors(path, "direction set")
        if set(tensors) != {"raw", "harmless_mean"}:
            raise UserError(f"{path} is not a direction set (tensors raw, harmless_mean); write it with abliterate.")
        return cls(tensors["raw"].double(), tensors["harmless_mean"].double())
