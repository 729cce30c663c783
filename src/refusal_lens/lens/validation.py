"""Validating upstream latents by steering (the word-level ground truth is in :mod:`refusal_lens.lens.ground_truth`).

A latent with a positive refusal-gradient score should *raise* refusal when added; one with a
negative score should *lower* it. Both are steered the same way (added, never subtracted), so the test is
whether the sign of the gradient score predicts the sign of the behavioural change.
:func:`steering_validation` measures refusal rates on a fixed prompt set; :func:`boundary_steering` measures
them where a change is possible at all (the positive latent on prompts answered at baseline, the negative
latent on prompts refused at baseline), at several sizes, next to random latents of the same size, and with
the change of R (the refusal projection) as a continuous read-out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from ..direction.scoring import is_refusal_text
from ..evaluation.generation import GenerationSettings, generate
from .latents import add_latent, sae_site
from .upstream import refusal_projection


def latent_scales(activations: torch.Tensor, latents: Sequence[int]) -> dict[int, float]:
    """A natural steering size per latent: its mean activation where it fires (``activations [n, d_sae]``).

    Steering by a multiple of this is comparable across latents whose decoder rows have the same norm but
    whose typical activations differ by orders of magnitude.
    """
    out = {}
    for k in latents:
        col = activations[:, k]
        fired = col[col > 0]
        out[int(k)] = float(fired.mean()) if len(fired) else float(activations[activations > 0].mean())
    return out


def steering_validation(
    model: nn.Module,
    tokenizer: Any,
    formatter: ChatFormatter,
    sae: Any,
    prompts: Sequence[str],
    result: Any,
    alpha: float,
    n_latents: int = 3,
    max_new_tokens: int = 64,
    scales: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Refusal rate of greedy replies with each top positive and top negative latent added at prompt positions.

    The added vector is ``alpha · scales[k] · W_dec[k]`` (``scales`` defaults to 1 for every latent). Each row
    gives the latent, its gradient sign, the rate, the change from the unsteered rate and whether that
    change has the predicted sign.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rows: list[dict[str, Any]] = []

    def rate(factory: Any) -> tuple[float, str]:
        comps = generate(model, tokenizer, list(prompts), factory, settings, formatter=formatter, progress=False)
        return sum(is_refusal_text(c.completion) for c in comps) / len(comps), comps[0].completion

    base, example = rate(None)
    rows.append({"latent": None, "alpha": 0.0, "refusal_rate": base, "example": example, "n": len(prompts)})
    for side, items in (("positive", result.positive[:n_latents]), ("negative", result.negative[:n_latents])):
        for item in items:
            k = int(item["latent"])
            a = alpha * (scales or {}).get(k, 1.0)
            r, example = rate(lambda k=k, a=a: add_latent(model, sae, k, a, positions="prompt"))
            change = r - base
            rows.append({
                "latent": k, "side": side, "alpha": a, "refusal_rate": r, "change": change, "example": example,
                "n": len(prompts), "as_predicted": change > 0 if side == "positive" else change < 0,
            })  # fmt: skip
    return rows


def refusals(
    model: nn.Module,
    tokenizer: Any,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    factory: Any = None,
    max_new_tokens: int = 32,
) -> list[bool]:
    """Is each greedy reply (under the context ``factory()``, if any) a refusal (substring judge)?"""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    comps = generate(model, tokenizer, list(prompts), factory, settings, formatter=formatter, progress=False)
    return [is_refusal_text(c.completion) for c in comps]


@torch.no_grad()
def mean_site_norm(model: nn.Module, formatter: ChatFormatter, sae: Any, prompts: Sequence[str]) -> float:
    """Mean norm of the activation at the SAE's site over the prompts' tokens (padding and first token excluded)."""
    layer, site = sae_site(sae)
    norms: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        norms.append(x.float().norm(dim=-1).cpu())

    with site_hooks(model, {(layer, site): grab}):
        for batch in formatter.batches(list(prompts), 32, input_device(model)):
            model(**batch, use_cache=False, logits_to_keep=1)
            keep = batch["attention_mask"].bool().cpu() & (batch["position_ids"].cpu() > 0)
            norms[-1] = norms[-1][keep]
    return float(torch.cat(norms).mean())


def control_latents(d_sae: int, exclude: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``n`` latents drawn uniformly (seeded) from those not in ``exclude``: the random-latent controls."""
    skip = set(exclude)
    order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed)).tolist()
    return [k for k in order if k not in skip][:n]


def boundary_steering(
    model: nn.Module,
    tokenizer: Any,
    formatter: ChatFormatter,
    sae: Any,
    direction: torch.Tensor,
    target_layer: int,
    prompts: Sequence[str],
    latents: Sequence[tuple[str, int, str]],
    scales: Mapping[int, float],
    multiples: Sequence[float] = (1.0, 2.0, 4.0),
    n_controls: int = 1,
    seed: int = 0,
    max_new_tokens: int = 32,
    baseline: Sequence[bool] | None = None,
    target_position: int = -1,
) -> dict[str, Any]:
    """Steering where it can show an effect, next to random latents of the same size.

    ``latents`` are ``(role, latent, expect)`` with ``expect`` "raise" or "lower". Baseline greedy replies
    (``baseline``, if already known, else generated) split ``prompts`` into answered and refused; a latent
    expected to raise refusal is added on the answered ones, one expected to lower it on the refused ones,
    at ``multiple × scales[k]`` (its mean firing activation) at the prompt's positions. Every setting is
    repeated with ``n_controls`` random latents of the same size (decoder rows of equal norm, as in the
    SAEs this is used with; ``alpha_over_site_norm`` compares the size with the mean activation norm at the
    site, since at sizes near it any direction breaks the model). Each row gives, on that subset, the
    refusal rate and the mean change of R for the latent and for the controls (mean), and whether the
    latent moved each further than the controls in the expected direction. R is read at ``target_position``
    (the direction's own position; a direction selected at −5 read at −1 would measure another quantity).
    """
    base = (
        list(baseline) if baseline is not None else refusals(model, tokenizer, formatter, prompts, None, max_new_tokens)
    )
    r0 = refusal_projection(model, formatter, list(prompts), direction, target_layer, target_position)
    norm = mean_site_norm(model, formatter, sae, prompts)
    controls = control_latents(sae.W_dec.shape[0], [k for _, k, _ in latents], n_controls, seed)
    rows: list[dict[str, Any]] = []
    for role, k, expect in latents:
        if expect not in ("raise", "lower"):
            raise UserError(f"expect must be 'raise' or 'lower', not {expect!r}.")
        idx = [i for i, refused in enumerate(base) if refused == (expect == "lower")]
        sub = [prompts[i] for i in idx]
        for mult in multiples:
            alpha = float(mult) * scales[k]
            row: dict[str, Any] = {"role": role, "latent": k, "expect": expect, "multiple": float(mult),
                                   "alpha": alpha, "alpha_over_site_norm": alpha / norm,
                                   "subset": "refused" if expect == "lower" else "answered", "n": len(sub)}  # fmt: skip
            if not sub:
                rows.append(row | {"skipped": f"no prompt is {row['subset']} at baseline"})
                continue
            effect = lambda j, a=alpha, s=sub, r=r0[idx]: _steered(  # noqa: E731
                model, tokenizer, formatter, sae, direction, target_layer, s, r, j, a, max_new_tokens, target_position
            )
            rate, d_r = effect(k)
            ctrl = [effect(j) for j in controls]
            c_rate = sum(c[0] for c in ctrl) / len(ctrl) if ctrl else float("nan")
            c_dr = sum(c[1] for c in ctrl) / len(ctrl) if ctrl else float("nan")
            sign = 1 if expect == "raise" else -1
            rows.append(row | {
                "refusal_rate": rate, "mean_delta_R": d_r, "control_refusal_rate": c_rate,
                "control_mean_delta_R": c_dr, "as_predicted": sign * (rate - c_rate) > 0,
                "delta_R_as_predicted": sign * (d_r - c_dr) > 0,
            })  # fmt: skip
    return {
        "n_prompts": len(prompts), "baseline_refusal_rate": sum(base) / len(base) if base else float("nan"),
        "n_answered": base.count(False), "n_refused": base.count(True), "controls": controls,
        "site_norm": norm, "positions": "prompt", "max_new_tokens": max_new_tokens, "rows": rows,
    }  # fmt: skip


def _steered(
    model: nn.Module,
    tokenizer: Any,
    formatter: ChatFormatter,
    sae: Any,
    direction: torch.Tensor,
    target_layer: int,
    prompts: Sequence[str],
    r0: torch.Tensor,
    latent: int,
    alpha: float,
    max_new_tokens: int,
    target_position: int = -1,
) -> tuple[float, float]:
    """(refusal rate, mean change of R) with ``alpha·W_dec[latent]`` added at the prompt's positions."""
    factory = lambda: add_latent(model, sae, latent, alpha, positions="prompt")  # noqa: E731
    refused = refusals(model, tokenizer, formatter, prompts, factory, max_new_tokens)
    r = refusal_projection(model, formatter, list(prompts), direction, target_layer, target_position, factory)
    return sum(refused) / len(refused), float((r - r0).mean())
