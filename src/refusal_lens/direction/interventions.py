"""Interventions on a direction, as context managers.

* :func:`ablate_direction` — directional ablation (Arditi et al.): ``x ← x − r̂ r̂ᵀ x`` at every layer's
  input and on every write into the residual stream (attention and MLP outputs; after the post-sublayer
  norm in families that have one), at all positions, generated tokens included.
* :func:`add_direction` — activation addition ``x ← x + c·r`` at one layer's input.
* :func:`apply_direction` — any operator at any set of sites, for steering experiments.

A direction is ``[d_model]`` (one for the whole batch) or ``[batch, d_model]`` (one per row: several
candidate directions can be scored in one forward pass).

Example:
    >>> with ablate_direction(model, r):                     # doctest: +SKIP
    ...     out = model.generate(**batch, max_new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import nn

from ..core.adapters import ArchitectureAdapter, get_adapter
from ..core.hooks import Site, module_output_hooks, site_hooks

Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Positions = Literal["all", "prompt"] | Sequence[int]


def _as_rows(direction: torch.Tensor, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Shape a ``[d]`` or ``[B, d]`` direction to broadcast against ``x [B, T, d]`` on x's device/dtype.

    ``cache`` keeps the converted copy per (device, dtype): hooks run at every layer of every step, and a
    model split over several devices (``device_map``) needs one copy per device.
    """
    key = (x.device, x.dtype)
    if cache is not None and key in cache:
        return cache[key]
    d = direction.to(device=x.device, dtype=x.dtype)
    d = d.view(1, 1, -1) if d.ndim == 1 else d.unsqueeze(1)
    if cache is not None:
        cache[key] = d
    return d


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``x − (x·u) u`` for a unit vector ``u`` (already shaped by :func:`_as_rows`)."""
    if unit.shape[0] == 1:  # one direction for the whole batch: a matrix-vector product is cheapest
        u = unit.view(-1)
        return x - torch.outer((x.reshape(-1, u.shape[0]) @ u), u).view_as(x)
    return x - (x * unit).sum(-1, keepdim=True) * unit


def unit(direction: torch.Tensor) -> torch.Tensor:
    """Normalise a ``[d]`` or ``[B, d]`` direction (in float64, to keep tiny vectors exact)."""
    d = direction.double()
    return (d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)).to(direction.dtype)


def adder(coeff: float = 1.0) -> Operator:
    """Operator ``x + coeff·r``."""
    return lambda x, r: x + coeff * r


def projection_setter(value: float | torch.Tensor) -> Operator:
    """Operator that sets the projection on the unit direction to ``value`` (e.g. the harmless mean)."""

    def op(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return project_out(x, u) + torch.as_tensor(value, dtype=x.dtype, device=x.device) * u

    return op


def _positioned(op: Operator, direction: torch.Tensor, positions: Positions) -> Callable:
    cache: dict = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = _as_rows(direction, x, cache)
        if isinstance(positions, str) and positions == "all":
            return op(x, r)
        if x.shape[1] == 1:
            # A cached generation step (one new token): prompt-only edits do not apply to it.
            return x
        if isinstance(positions, str):  # "prompt"
            return op(x, r)
        out = x.clone()
        idx = torch.tensor(list(positions), device=x.device) % x.shape[1]
        out[:, idx] = op(x[:, idx], r)
        return out

    return fn


@contextmanager
def apply_direction(
    model: nn.Module,
    direction: torch.Tensor,
    operator: Operator,
    sites: Sequence[Site],
    positions: Positions = "all",
    adapter: ArchitectureAdapter | None = None,
) -> Iterator[ArchitectureAdapter]:
    """Apply ``operator(x, direction)`` at each ``(layer, site)`` inside the block.

    ``positions``: "all" (every position, generated tokens included), "prompt" (the prompt pass only), or
    a list of prompt positions (negative = from the end, e.g. ``[-1]`` for the last prompt token).
    """
    fn = _positioned(operator, direction, positions)
    with site_hooks(model, {site: fn for site in sites}, adapter) as used:
        yield used


@contextmanager
def ablate_direction(
    model: nn.Module,
    direction: torch.Tensor,
    adapter: ArchitectureAdapter | None = None,
    layers: Sequence[int] | None = None,
) -> Iterator[ArchitectureAdapter]:
    """Directional ablation of ``direction`` (normalised here) at every layer and residual write.

    With all layers ablated, the input of layer 0 (the embeddings) and every write are projected; the input
    of a later layer is the sum of those, so it has no component along ``r̂`` either and needs no hook of its
    own (a third fewer hooks on the generation hot path). With a subset of ``layers``, each of their
    inputs is projected too.
    """
    adapter = adapter or get_adapter(model)
    u = unit(direction)
    all_layers = layers is None
    layers = range(adapter.n_layers) if layers is None else layers
    ablate = _positioned(project_out, u, "all")
    writes = [m for layer in layers for m in (adapter.attn_write(layer), adapter.mlp_write(layer))]
    inputs = [0] if all_layers else list(layers)
    with ExitStack() as stack:
        stack.enter_context(site_hooks(model, {(layer, "resid_pre"): ablate for layer in inputs}, adapter))
        stack.enter_context(module_output_hooks(writes, ablate))
        yield adapter


@contextmanager
def add_direction(
    model: nn.Module,
    direction: torch.Tensor,
    layer: int,
    coeff: float = 1.0,
    positions: Positions = "all",
    adapter: ArchitectureAdapter | None = None,
) -> Iterator[ArchitectureAdapter]:
    """Activation addition ``x ← x + coeff·r`` (raw, un-normalised ``r``) at the input of ``layer``."""
    with apply_direction(model, direction, adder(coeff), [(layer, "resid_pre")], positions, adapter) as a:
        yield a
