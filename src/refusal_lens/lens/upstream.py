"""Features upstream of refusal (Lee, Breck, Arditi 2025): the refusal gradient read through an SAE.

For a prompt with N tokens, the refusal direction ``r`` (its layer L is the *target*) and an SAE at an
earlier *source* layer l < L:

1. ``R = ⟨resid_pre[L][target position], r̂⟩`` (default target: the last prompt token);
2. ``g_i = ∂R/∂resid[l][i]`` at every position i, from one backward pass;
3. latent scores ``RG[i, k] = W_dec[k]·g_i`` ("dot"), or their cosine, or the attribution
   ``f_k(x_i)·RG[i, k]`` (first-order effect of removing the latent's actual activation); aggregated over
   positions by mean or sum;
4. the highest scores are latents upstream of refusal, the most negative push against it.

Without an SAE the same gradient gives token saliency (``‖g_i‖`` and gradient × input).
Validation: adding ``α·W_dec[k]`` at layer l at every prompt position changes R by ≈ ``α·Σ_i RG[i, k]``.
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
from ..direction.interventions import adder, apply_direction
from .latents import decoder_row, sae_site

SCORES = ("dot", "cosine", "attribution")
AGGREGATES = ("mean", "sum")


@dataclass
class RefusalGradient:
    """R and its gradient at the source site for one prompt."""

    value: float  # R
    grad: torch.Tensor  # [T, d] dR/d resid[source] (float64, padding-free)
    acts: torch.Tensor  # [T, d] the source activations
    tokens: list[str]
    instruction_mask: torch.Tensor  # [T] True on the user's instruction tokens (not the template)
    source: tuple[int, str]
    target_layer: int
    target_position: int

    def saliency(self) -> dict[str, list[float]]:
        """Per-token gradient norm and gradient × input (where the gradient enters)."""
        return {
            "grad_norm": self.grad.norm(dim=-1).tolist(),
            "grad_x_input": (self.grad * self.acts).sum(-1).tolist(),
        }


def instruction_mask(formatter: ChatFormatter, prompt: str, ids: list[int]) -> torch.Tensor:
    """Mark the tokens that come from the instruction text (between the template's prefix and suffix)."""
    text = formatter.format(prompt)
    start = text.rfind(prompt)
    tok = formatter.tokenizer
    mask = torch.zeros(len(ids), dtype=torch.bool)
    try:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        mask[: len(ids) - formatter.n_eoi] = True
        return mask
    for i, (a, b) in enumerate(offsets):
        mask[i] = start >= 0 and a >= start and b <= start + len(prompt) and b > a
    return mask


def refusal_gradient(
    model: nn.Module,
    formatter: ChatFormatter,
    prompt: str,
    direction: torch.Tensor,
    target_layer: int,
    source_layer: int,
    source_site: str = "resid_pre",
    target_position: int = -1,
) -> RefusalGradient:
    """One forward and one backward pass: ``R`` and ``∂R/∂resid[source]`` at every position."""
    adapter = get_adapter(model)
    adapter.check_layer(target_layer)
    adapter.check_layer(source_layer)
    if source_layer >= target_layer:
        raise UserError(
            f"the source layer ({source_layer}) must come before the target layer ({target_layer}); "
            "the gradient of R with respect to a later activation is zero."
        )
    if direction.shape != (adapter.d_model,):
        raise UserError(f"direction has shape {list(direction.shape)}; the model's hidden size is {adapter.d_model}.")
    batch = formatter.encode([prompt], input_device(model))
    n_tokens = batch["input_ids"].shape[1]
    if not -n_tokens <= target_position < n_tokens:
        raise UserError(
            f"--target-position {target_position} is outside the prompt's {n_tokens} tokens; use -1 (the last "
            f"token) down to -{n_tokens}."
        )
    unit = (direction / direction.norm()).to(adapter.embed.weight.dtype)
    state: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor) -> torch.Tensor:
        h = x.detach().requires_grad_(True)  # a leaf: its .grad is dR/d(source activation)
        state["source"] = h
        return h

    def read_target(x: torch.Tensor) -> None:
        state["R"] = (x[0, target_position] * unit.to(x.device)).sum()

    with (
        torch.enable_grad(),
        site_hooks(model, {(source_layer, source_site): leaf, (target_layer, "resid_pre"): read_target}, adapter),
    ):
        model(**batch, use_cache=False, logits_to_keep=1)
        state["R"].backward()
    ids = batch["input_ids"][0].tolist()
    return RefusalGradient(
        value=float(state["R"].detach()),
        grad=state["source"].grad[0].detach().double().cpu(),
        acts=state["source"][0].detach().double().cpu(),
        tokens=formatter.tokenizer.convert_ids_to_tokens(ids),
        instruction_mask=instruction_mask(formatter, prompt, ids),
        source=(source_layer, source_site),
        target_layer=target_layer,
        target_position=target_position,
    )


def latent_scores(
    rg: RefusalGradient, sae: Any, score: str = "dot", aggregate: str = "mean", positions: str = "all"
) -> torch.Tensor:
    """Per-latent scores ``[d_sae]`` from a refusal gradient (see module doc)."""
    if score not in SCORES or aggregate not in AGGREGATES:
        raise UserError(f"score must be one of {SCORES} and aggregate one of {AGGREGATES}.")
    w_dec = sae.W_dec.detach().double().cpu()
    keep = rg.instruction_mask if positions == "instruction" else torch.ones(len(rg.tokens), dtype=torch.bool)
    if positions == "instruction" and not keep.any():
        keep = torch.ones(len(rg.tokens), dtype=torch.bool)
    g = rg.grad[keep]
    if score == "attribution":
        per_pos = token_attribution(rg, sae)[keep]
    else:
        per_pos = g @ w_dec.T  # [T, d_sae] = RG[i, k]
    if score == "cosine":
        per_pos = per_pos / (g.norm(dim=-1, keepdim=True) * w_dec.norm(dim=-1)).clamp_min(1e-12)
    return per_pos.mean(0) if aggregate == "mean" else per_pos.sum(0)


def token_attribution(rg: RefusalGradient, sae: Any) -> torch.Tensor:
    """``A[i, k] = f_k(x_i) · (g_i · W_dec[k])`` at every position, ``[T, d_sae]`` float64.

    The first-order change of R when latent k's actual contribution ``f_k(x_i)·W_dec[k]`` is removed at
    position i alone is ``−A[i, k]``: the per-token heat map of where (and through which latent) the
    refusal gradient enters.
    """
    w_dec = sae.W_dec.detach().double().cpu()
    with torch.no_grad():
        f = sae.encode(rg.acts.to(sae.W_dec.device, sae.W_dec.dtype)).double().cpu()
    return f * (rg.grad @ w_dec.T)


@dataclass
class UpstreamResult:
    prompt: str
    value: float
    positive: list[dict[str, float]]
    negative: list[dict[str, float]]
    tokens: list[str]
    saliency: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def upstream_features(
    model: nn.Module,
    formatter: ChatFormatter,
    prompt: str,
    direction: torch.Tensor,
    target_layer: int,
    sae: Any | None = None,
    source_layer: int | None = None,
    score: str = "dot",
    aggregate: str = "mean",
    positions: str = "all",
    top: int = 10,
    target_position: int = -1,
) -> UpstreamResult:
    """Top positively and negatively aligned latents for one prompt (token saliency only without an SAE)."""
    if sae is not None:
        layer, site = sae_site(sae, source_layer)
    else:
        layer, site = (target_layer - 1 if source_layer is None else source_layer), "resid_pre"
    rg = refusal_gradient(model, formatter, prompt, direction, target_layer, layer, site, target_position)
    scores = latent_scores(rg, sae, score, aggregate, positions) if sae is not None else None
    return upstream_result(prompt, rg, scores, top, score=score, aggregate=aggregate, positions=positions)


def upstream_result(
    prompt: str, rg: RefusalGradient, scores: torch.Tensor | None, top: int = 10, **settings: Any
) -> UpstreamResult:
    """The :class:`UpstreamResult` of a computed gradient and per-latent ``scores`` (None: saliency only)."""
    pos: list[dict[str, float]] = []
    neg: list[dict[str, float]] = []
    if scores is not None:
        order = torch.argsort(scores, descending=True)
        pos = [{"latent": int(k), "score": float(scores[k])} for k in order[:top]]
        neg = [{"latent": int(k), "score": float(scores[k])} for k in order.flip(0)[:top]]
    layer, site = rg.source
    return UpstreamResult(
        prompt=prompt,
        value=rg.value,
        positive=pos,
        negative=neg,
        tokens=rg.tokens,
        saliency=rg.saliency(),
        settings={
            "source_layer": layer,
            "source_site": site,
            "target_layer": rg.target_layer,
            "target_position": rg.target_position,
            **settings,
        },
    )


@torch.no_grad()
def refusal_projection(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    direction: torch.Tensor,
    target_layer: int,
    target_position: int = -1,
    context: Any = None,
) -> torch.Tensor:
    """``R`` for each prompt (optionally under an intervention context factory), ``[n]`` float64."""
    unit = (direction / direction.norm()).double()
    out: list[torch.Tensor] = []
    grab = lambda x: out.append(x[:, target_position].double().cpu() @ unit)  # noqa: E731
    device = input_device(model)
    with site_hooks(model, {(target_layer, "resid_pre"): grab}):
        for batch in formatter.batches(list(prompts), 32, device):
            if context is None:
                model(**batch, use_cache=False, logits_to_keep=1)
            else:
                with context():
                    model(**batch, use_cache=False, logits_to_keep=1)
    return torch.cat(out)


def first_order_check(
    model: nn.Module,
    formatter: ChatFormatter,
    prompt: str,
    direction: torch.Tensor,
    target_layer: int,
    sae: Any,
    latent: int,
    alphas: Sequence[float] = (0.01, 0.03, 0.1),
    target_position: int = -1,
) -> list[dict[str, float]]:
    """Measured ΔR under ``+α·W_dec[k]`` at the SAE's site (all prompt positions) vs predicted ``α·Σ_i RG[i,k]``."""
    layer, site = sae_site(sae)
    rg = refusal_gradient(model, formatter, prompt, direction, target_layer, layer, site, target_position)
    row = decoder_row(sae, latent)
    slope = float((rg.grad @ row.double()).sum())
    base = float(refusal_projection(model, formatter, [prompt], direction, target_layer, target_position)[0])
    rows = []
    for alpha in alphas:
        steer = lambda a=alpha: apply_direction(model, row, adder(a), [(layer, site)], "prompt")  # noqa: E731
        got = float(refusal_projection(model, formatter, [prompt], direction, target_layer, target_position, steer)[0])
        rows.append({"alpha": alpha, "predicted": alpha * slope, "measured": got - base})
    return rows
