"""Decomposing a direction with an SAE (Kissane et al. 2024, "SAEs are highly dataset dependent").

Given harmful and harmless prompts and an SAE at the direction's site:

* reconstruction ``r_SAE = mean SAE(harmful) − mean SAE(harmless) = Δf̄·W_dec`` (``b_dec`` cancels), its
  cosine with ``r`` and relative error ``‖r_SAE − r‖² / ‖r‖²``;
* single-latent alignment: latents ranked by ``cos(W_dec[k], r)``;
* sparsity curve: with decoder rows normalised (norms folded into the activations), the best fit of ``r``
  from the top-k latents by ``|Δf̄|`` (exact least squares) for k = 1, 2, 4 … 512, and orthogonal matching
  pursuit as a second support rule.

Here ``r`` is the difference in means of the *same* prompts' activations at the SAE's site (so the SAE is
judged on exactly what it is fed); its cosine with a stored direction is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from .latents import sae_site


@torch.no_grad()
def site_activations(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    layer: int,
    site: str,
    position: int = -1,
    batch_size: int = 32,
) -> torch.Tensor:
    """Activations ``[n, d]`` (float32) at ``(layer, site)`` and one prompt position (negative index)."""
    get_adapter(model).check_layer(layer)
    rows: list[torch.Tensor] = []
    grab = lambda x: rows.append(x[:, position].detach().float().cpu())  # noqa: E731
    device = input_device(model)
    with site_hooks(model, {(layer, site): grab}):
        for batch in formatter.batches(list(prompts), batch_size, device):
            model(**batch, use_cache=False)
    return torch.cat(rows)


def k_values(width: int, max_k: int = 512) -> list[int]:
    ks, k = [], 1
    while k <= min(width, max_k):
        ks.append(k)
        k *= 2
    return ks


def _lstsq_error(r: torch.Tensor, rows: torch.Tensor) -> float:
    """Relative error ‖r − fit‖²/‖r‖² of the least-squares fit of ``r`` by ``rows [k, d]`` (float64)."""
    coef = torch.linalg.lstsq(rows.T, r.unsqueeze(1)).solution
    resid = r - (rows.T @ coef).squeeze(1)
    return float(resid.pow(2).sum() / r.pow(2).sum())


def sparsity_curve(r: torch.Tensor, w_dec: torch.Tensor, delta_f: torch.Tensor, ks: Sequence[int]) -> list[list[float]]:
    """``[[k, error]]`` for the top-k latents by |Δf̄| with unit-norm decoder rows (least squares)."""
    norms = w_dec.norm(dim=1).clamp_min(1e-12)
    order = torch.argsort((delta_f * norms).abs(), descending=True)
    unit_rows = w_dec / norms[:, None]
    return [[k, _lstsq_error(r, unit_rows[order[:k]])] for k in ks]


def omp_curve(r: torch.Tensor, w_dec: torch.Tensor, ks: Sequence[int]) -> list[list[float]]:
    """``[[k, error]]`` for orthogonal matching pursuit over unit-norm decoder rows."""
    unit_rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    chosen: list[int] = []
    resid, out = r.clone(), []
    for k in range(1, max(ks) + 1):
        scores = (unit_rows @ resid).abs()
        if chosen:
            scores[chosen] = -1
        chosen.append(int(scores.argmax()))
        rows = unit_rows[chosen]
        coef = torch.linalg.lstsq(rows.T, r.unsqueeze(1)).solution
        resid = r - (rows.T @ coef).squeeze(1)
        if k in ks:
            out.append([k, float(resid.pow(2).sum() / r.pow(2).sum())])
    return out


@dataclass
class Decomposition:
    name: str
    cosine: float
    relative_error: float
    max_single_latent_cosine: float
    top_latents: list[dict[str, float]]
    sparsity_curve: list[list[float]]
    omp_curve: list[list[float]]
    cosine_with_given_direction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@torch.no_grad()
def decompose_direction(
    model: nn.Module,
    formatter: ChatFormatter,
    sae: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    position: int = -1,
    direction: torch.Tensor | None = None,
    name: str = "sae",
    max_k: int = 512,
    n_top: int = 10,
) -> Decomposition:
    """Decompose the harmful − harmless difference in means at the SAE's site (see module doc)."""
    if not harmful or not harmless:
        raise UserError("decomposition needs non-empty harmful and harmless prompt lists.")
    layer, site = sae_site(sae)
    d_model = get_adapter(model).d_model
    if sae.W_dec.shape[1] != d_model:
        raise UserError(f"SAE {name} has width d_in {sae.W_dec.shape[1]} but the model's hidden size is {d_model}.")
    xh = site_activations(model, formatter, harmful, layer, site, position)
    xb = site_activations(model, formatter, harmless, layer, site, position)
    r = xh.double().mean(0) - xb.double().mean(0)
    dtype = sae.W_dec.dtype
    fh, fb = sae.encode(xh.to(dtype)).double(), sae.encode(xb.to(dtype)).double()
    delta_f = fh.mean(0) - fb.mean(0)
    w_dec = sae.W_dec.detach().double().cpu()
    r_sae = delta_f @ w_dec  # = mean SAE(harmful) − mean SAE(harmless): b_dec cancels (tested)
    cos = torch.nn.functional.cosine_similarity
    latent_cos = cos(w_dec, r.unsqueeze(0), dim=1)
    top = torch.argsort(latent_cos, descending=True)[:n_top]
    ks = k_values(w_dec.shape[0], max_k)
    return Decomposition(
        name=name,
        cosine=float(cos(r_sae, r, dim=0)),
        relative_error=float((r_sae - r).pow(2).sum() / r.pow(2).sum()),
        max_single_latent_cosine=float(latent_cos.max()),
        top_latents=[{"latent": int(k), "cosine": float(latent_cos[k]), "delta_f": float(delta_f[k])} for k in top],
        sparsity_curve=sparsity_curve(r, w_dec, delta_f, ks),
        omp_curve=omp_curve(r, w_dec, ks),
        cosine_with_given_direction=None if direction is None else float(cos(r.float(), direction.float(), dim=0)),
        extra={
            "layer": layer,
            "site": site,
            "position": position,
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "width": int(w_dec.shape[0]),
            "r_norm": float(r.norm()),
        },
    )


def latents_for_error(curve: Sequence[Sequence[float]], target: float) -> int | None:
    """The smallest k in a sparsity curve whose relative error is ≤ ``target`` (None if never)."""
    return next((int(k) for k, err in curve if err <= target), None)
