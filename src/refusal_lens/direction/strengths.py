"""Ablation with a strength per layer and per write, as hooks and as edited weights.

An :class:`AblationPlan` gives, for every layer ``l``, a unit direction ``u_l`` and strengths ``λ_attn[l]``,
``λ_mlp[l]``, plus a strength and direction for the embeddings. Its two equivalent forms:

* hooks (:func:`weighted_ablation`): every write ``x`` of layer ``l`` becomes ``x − λ (x·u_l) u_l``;
* weights (:func:`edit_weights`, :func:`edited_weights`): every matrix ``W`` that makes that write becomes
  ``W − λ u_l u_lᵀ W`` (biases too), so the model computes the same thing without hooks. This is exact for
  pre-norm families; post-norm families (Gemma-2/3, OLMo-2) renormalise the write afterwards.

``norm_preserving=True`` is the "biprojected" weight edit: each row (one vector written into the residual
stream, along the model-width axis) is edited and then rescaled to its original norm. It is not a linear
function of the write, so it exists only as a weight edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapters import ArchitectureAdapter, ResidualWriter, get_adapter
from ..core.errors import UserError
from ..core.hooks import site_hooks
from .orthogonalize import refuse_inexact, refuse_offloaded, untie_embeddings
from .variants import normalise


@dataclass
class AblationPlan:
    """Directions and strengths of a weighted ablation."""

    directions: torch.Tensor  # [L, d] unit direction for the writes of each layer
    attn: torch.Tensor  # [L] strength on the attention output
    mlp: torch.Tensor  # [L] strength on the MLP output
    embed_direction: torch.Tensor | None = None  # [d]; default: directions[0]
    embed: float = 0.0  # strength on the token (and positional) embeddings

    def __post_init__(self) -> None:
        self.directions = normalise(torch.as_tensor(self.directions))
        self.attn = torch.as_tensor(self.attn, dtype=torch.float64).flatten()
        self.mlp = torch.as_tensor(self.mlp, dtype=torch.float64).flatten()
        n = self.directions.shape[0]
        if self.directions.ndim != 2 or self.attn.shape[0] != n or self.mlp.shape[0] != n:
            raise UserError(
                f"ablation plan shapes disagree: directions {list(self.directions.shape)}, attn strengths "
                f"{list(self.attn.shape)}, mlp strengths {list(self.mlp.shape)}; give one strength per layer."
            )
        e = self.directions[0] if self.embed_direction is None else torch.as_tensor(self.embed_direction)
        self.embed_direction = normalise(e)

    @classmethod
    def uniform(cls, direction: torch.Tensor, n_layers: int, strength: float = 1.0, embed: float = 1.0):
        """The paper's full ablation (``strength = embed = 1``) of one direction, or a uniform fraction of it."""
        u = normalise(direction)
        full = torch.full((n_layers,), float(strength), dtype=torch.float64)
        return cls(u.expand(n_layers, -1).clone(), full, full.clone(), u, embed)

    def sites(self) -> list[tuple[str, int | None, float, torch.Tensor]]:
        """``(kind, layer, strength, unit)`` of every nonzero edit."""
        out: list[tuple[str, int | None, float, torch.Tensor]] = []
        if self.embed:
            out.append(("embed", None, float(self.embed), self.embed_direction))
        for layer in range(self.directions.shape[0]):
            for kind, strengths in (("attn", self.attn), ("mlp", self.mlp)):
                if strengths[layer]:
                    out.append((kind, layer, float(strengths[layer]), self.directions[layer]))
        return out

    def check(self, adapter: ArchitectureAdapter) -> None:
        if self.directions.shape != (adapter.n_layers, adapter.d_model):
            raise UserError(
                f"ablation plan is for {self.directions.shape[0]} layers of width {self.directions.shape[1]}; the "
                f"model has {adapter.n_layers} layers of width {adapter.d_model}."
            )


def _remover(strength: float, u: torch.Tensor):
    cache: dict = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = u.to(device=x.device, dtype=x.dtype)
        v = cache[key]
        return x - strength * (x @ v).unsqueeze(-1) * v

    return fn


@contextmanager
def weighted_ablation(
    model: nn.Module, plan: AblationPlan, adapter: ArchitectureAdapter | None = None
) -> Iterator[ArchitectureAdapter]:
    """Hook form of ``plan``: each write of layer ``l`` loses ``λ`` times its component along ``u_l``.

    The embedding edit is applied to the input of layer 0, which is the embedding output (scaled, plus
    positional embeddings, in families that have them; the projection commutes with both).
    """
    adapter = adapter or get_adapter(model)
    plan.check(adapter)
    site = {"embed": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}
    fns = {(layer or 0, site[kind]): _remover(s, u) for kind, layer, s, u in plan.sites()}
    with site_hooks(model, fns, adapter) as used:
        yield used


def project_rows(
    tensor: torch.Tensor,
    unit: torch.Tensor,
    axis: int,
    strength: float = 1.0,
    norm_preserving: bool = False,
    chunk_bytes: int = 8 << 20,
) -> torch.Tensor:
    """``W − λ u uᵀ W`` along ``axis`` in float64 (chunked), optionally rescaling each row to its old norm.

    A *row* is one vector along ``axis`` (the model width): what one input unit or token writes.
    """
    moved = tensor.movedim(axis, -1)
    width = moved.shape[-1]
    rows_in = moved.reshape(-1, width)
    out = torch.empty(rows_in.shape, dtype=tensor.dtype, device=tensor.device)
    u = unit.double().to(tensor.device)
    step = max(1, chunk_bytes // (8 * width))
    for start in range(0, rows_in.shape[0], step):
        block = rows_in[start : start + step].double()
        edited = block - strength * torch.outer(block @ u, u)
        if norm_preserving:
            old, new = block.norm(dim=-1, keepdim=True), edited.norm(dim=-1, keepdim=True)
            edited = torch.where(new > 0, edited * (old / new.clamp_min(1e-300)), edited)
        out[start : start + step] = edited.to(tensor.dtype)
    return out.view(moved.shape).movedim(-1, axis).contiguous()


def _groups(adapter: ArchitectureAdapter) -> dict[tuple[str, int | None], list[ResidualWriter]]:
    return {(kind, layer): writers for kind, layer, writers in adapter.writer_groups()}


@torch.no_grad()
def edit_weights(model: nn.Module, plan: AblationPlan, norm_preserving: bool = False, force: bool = False) -> list[str]:
    """Apply ``plan`` to ``model``'s weights in place (unties tied embeddings first); returns edited names."""
    adapter = get_adapter(model)
    plan.check(adapter)
    refuse_inexact(adapter, force)
    refuse_offloaded(adapter)
    if plan.embed:
        untie_embeddings(model, adapter)
    groups = _groups(adapter)
    edited = []
    for kind, layer, strength, u in plan.sites():
        for writer in groups[(kind, layer)]:
            writer.param.copy_(project_rows(writer.param.data, u, writer.axis, strength, norm_preserving))
            edited.append(writer.name)
    return edited


@contextmanager
def edited_weights(
    model: nn.Module, plan: AblationPlan, norm_preserving: bool = False, force: bool = False
) -> Iterator[list[str]]:
    """Weight form of ``plan`` inside the block; the original weights are restored on exit.

    Tied embeddings are untied (permanently: the untied copy equals the original, so nothing changes).
    """
    adapter = get_adapter(model)
    plan.check(adapter)
    if plan.embed:
        untie_embeddings(model, adapter)
    groups = _groups(adapter)
    params = {w.name: w.param for kind, layer, _, _ in plan.sites() for w in groups[(kind, layer)]}
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield edit_weights(model, plan, norm_preserving, force)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
