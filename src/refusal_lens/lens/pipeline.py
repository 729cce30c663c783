"""The SAE-lens analyses of the demo: decomposition, latent ablation, upstream features, dashboards.

:func:`run_sae_lens` turns the two SAE papers into one call on a model, a direction and a set of SAEs:

1. decompose the direction with every SAE (Kissane et al.) and compare them;
2. ablate each SAE's most r-aligned latent and measure harmful refusal (next to ablating r itself);
3. for borderline prompts (benign, but reusing a harm category's words), find the latents of an SAE
   before the direction's layer that are upstream of refusal (Lee, Breck, Arditi), and check the
   *planted ground truth*: does the top upstream latent mark that category's words? Measured two ways:
   ``ground_truth``, the AUROC of the latent's max activation over a prompt's instruction tokens,
   separating harmful prompts of that category from harmless prompts (category level); and
   ``word_ground_truth`` (:mod:`refusal_lens.lens.validation`), at the level of the harm words the borderline
   prompts reuse: does the latent fire on those words in harmful prompts (vs harmless tokens), mark
   prompts containing them (vs harmless prompts, and vs other harmful prompts), and does its attribution
   peak on the word in the borderline prompts; next to a random-latent baseline, the share of the
   attribution that enters at the harm words at all, and the latent with the largest attribution there;
   then steering (``boundary_steering``): the top positive latent on prompts answered at baseline, the
   top negative one on prompts refused at baseline, at several sizes, next to random latents;
4. dashboards for the latents found;
5. ``word_mediation`` (:mod:`refusal_lens.lens.mediation`): whether swapping a borderline prompt's harm word for
   a neutral word lowers R, and through which positions (the word's tokens, other instruction tokens, the
   template) that effect passes at each layer before the direction's: the positions where an upstream
   latent can act at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import Prompt
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from ..direction.compute import Direction
from .decompose import decompose_direction, latents_for_error
from .ground_truth import (
    PromptAttribution,
    auroc,
    harm_vocabulary,
    harm_words,
    marking_table,
    prompt_attribution,
    word_ground_truth,
)
from .latents import ablate_latent, sae_site
from .mediation import word_mediation
from .upstream import (
    RefusalGradient,
    UpstreamResult,
    first_order_check,
    latent_scores,
    refusal_gradient,
    upstream_result,
)
from .validation import (
    boundary_steering,
    latent_scales,
    refusals,
    steering_validation,
)


@torch.no_grad()
def max_activation_per_prompt(
    model: nn.Module, formatter: ChatFormatter, sae: Any, prompts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``[n_prompts, d_sae]``: each latent's max activation over a prompt's instruction tokens."""
    layer, site = sae_site(sae)
    grab: dict[str, torch.Tensor] = {}
    rows = []
    n_suffix = formatter.n_eoi
    with site_hooks(model, {(layer, site): lambda x: grab.__setitem__("x", x)}):
        for batch in formatter.batches(list(prompts), batch_size, input_device(model)):
            model(**batch, use_cache=False, logits_to_keep=1)
            f = sae.encode(grab["x"].to(sae.W_dec.dtype)).float().cpu()
            mask = batch["attention_mask"].bool().cpu().clone()
            mask[:, -n_suffix:] = False  # the template's suffix is the same for every prompt
            f[~mask] = 0
            rows.append(f.amax(1))
    return torch.cat(rows)


def category_marking(
    model: nn.Module,
    formatter: ChatFormatter,
    sae: Any,
    category: str,
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    latents: Sequence[int],
    harmless_acts: torch.Tensor | None = None,
    harmful_acts: torch.Tensor | None = None,
) -> dict[str, Any]:
    """AUROC of each latent (and the best latent overall) for "harmful prompt of ``category``" vs harmless.

    ``harmless_acts`` and ``harmful_acts`` (from :func:`max_activation_per_prompt` on ``harmless`` and
    ``harmful``) save recomputing them.
    """
    rows = [i for i, p in enumerate(harmful) if p.category == category]
    pos = [harmful[i].instruction for i in rows]
    neg = [p.instruction for p in harmless]
    a_pos = harmful_acts[rows] if harmful_acts is not None else max_activation_per_prompt(model, formatter, sae, pos)
    a_neg = harmless_acts if harmless_acts is not None else max_activation_per_prompt(model, formatter, sae, neg)
    scores = {int(k): auroc(a_pos[:, k], a_neg[:, k]) for k in latents}
    # the best single latent for this category, for scale
    mean_gap = a_pos.mean(0) - a_neg.mean(0)
    best = int(mean_gap.argmax())
    return {
        "category": category, "n_pos": len(pos), "n_neg": len(neg), "auroc": scores,
        "best_latent": best, "best_latent_auroc": auroc(a_pos[:, best], a_neg[:, best]),
    }  # fmt: skip


def category_gradients(
    model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], direction: Direction, sae: Any
) -> list[RefusalGradient]:
    """The refusal gradient of each prompt at the SAE's site (one backward pass each, shared by every reading)."""
    layer, site = sae_site(sae)
    return [refusal_gradient(model, formatter, p, direction.vector, direction.layer, layer, site) for p in prompts]


def category_scores(
    gradients: Sequence[RefusalGradient], sae: Any, score: str = "dot", positions: str = "all"
) -> torch.Tensor:
    """``[d_sae]``: the mean over prompts of each prompt's latent scores (``aggregate="mean"``)."""
    return torch.stack([latent_scores(rg, sae, score, "mean", positions) for rg in gradients]).mean(0)


def category_upstream(
    prompts: Sequence[str],
    gradients: Sequence[RefusalGradient],
    sae: Any,
    score: str = "dot",
    positions: str = "all",
    top: int = 5,
    scores: torch.Tensor | None = None,
) -> UpstreamResult:
    """Latents upstream of refusal for a *set* of prompts: per-prompt scores averaged, then ranked.

    One prompt's ranking is noisy (a latent can win on a single wording); the mean over prompts that
    share a concept keeps what they have in common. Tokens and saliency are those of the first prompt.
    ``scores`` (from :func:`category_scores` with the same arguments) saves recomputing the mean.
    """
    mean = scores if scores is not None else category_scores(gradients, sae, score, positions)
    return upstream_result(prompts[0], gradients[0], mean, top, score=score, aggregate="mean", positions=positions,
                           prompts_averaged=len(prompts))  # fmt: skip


def category_vocabularies(harmful: Sequence[Prompt], harmless: Sequence[Prompt]) -> dict[str, frozenset[str]]:
    """Each harm category's vocabulary (:func:`.ground_truth.harm_vocabulary`); their union under ``""``."""
    benign = [p.instruction for p in harmless]
    by_category: dict[str, list[str]] = {}
    for p in harmful:
        by_category.setdefault(p.category or "", []).append(p.instruction)
    out = {c: harm_vocabulary(texts, benign) for c, texts in by_category.items() if c}
    return out | {"": harm_vocabulary([p.instruction for p in harmful], benign)}


def run_sae_lens(
    model: nn.Module,
    tokenizer: Any,
    direction: Direction,
    sae_paths: Mapping[str, str | Path],
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    borderline: Sequence[Prompt],
    upstream_sae: str | Path | None = None,
    evaluate_harmful: Any = None,
    n_decompose: int = 64,
    n_borderline: int = 10,
    n_category_prompts: int = 8,
    n_steer_prompts: int = 16,
    steer_alpha: float | None = 2.0,
    vocabulary_prompts: tuple[Sequence[Prompt], Sequence[Prompt]] | None = None,
    n_truth_prompts: int = 32,
    n_boundary_prompts: int = 32,
    # 16x: the top negative latents fire weakly (1x is ~0.08 of the residual norm), and the refused prompts
    # they must flip sit far above the boundary (R ~ 5 vs ~ 1), so only ~1.3 |x| shows their effect.
    steer_multiples: Sequence[float] = (2.0, 4.0, 16.0),
    n_controls: int = 1,
    n_mediation_prompts: int = 48,
) -> dict[str, Any]:
    """Run the analyses above; ``evaluate_harmful(conditions) -> {name: refusal rate}`` measures ablations.

    Upstream features are read for up to ``n_borderline`` borderline categories, each from the mean
    gradient scores of ``n_category_prompts`` prompts; with ``steer_alpha`` the top positive and negative
    latents are validated by generation on ``n_steer_prompts`` prompts of the category (each latent added
    at ``steer_alpha`` × its mean firing activation).

    Word-level ground truth (:func:`~refusal_lens.lens.ground_truth.word_ground_truth`) uses ``n_truth_prompts``
    prompts of each category; the harm vocabulary comes from ``vocabulary_prompts`` = (harmful, harmless)
    (default: ``harmful`` and ``harmless``; pass larger sets, e.g. the training splits, for a fuller
    vocabulary), the reference activations from ``harmful`` and ``harmless``. With ``steer_multiples``,
    :func:`~refusal_lens.lens.validation.boundary_steering` validates each reading's top latents on
    ``n_boundary_prompts`` prompts of the category, with ``n_controls`` random latents of the same size.
    Word mediation uses up to ``n_mediation_prompts`` borderline prompts with harm words (swaps that lower R
    by at least 1).
    """
    from ..sae.formats import load_sae

    fmt = ChatFormatter(tokenizer)
    saes = {name: load_sae(path, d_model=direction.vector.shape[0]) for name, path in sae_paths.items()}
    h_text = [p.instruction for p in harmful[:n_decompose]]
    b_text = [p.instruction for p in harmless[:n_decompose]]
    out: dict[str, Any] = {"decomposition": [], "latent_ablation": [], "upstream": [], "dashboards": []}
    for name, sae in saes.items():
        dec = decompose_direction(model, fmt, sae, h_text, b_text, direction.position, direction.vector, name)
        out["decomposition"].append(
            dec.to_json() | {"latents_for_half_error": latents_for_error(dec.sparsity_curve, 0.5)}
        )
    if evaluate_harmful is not None:
        conditions = {}
        for dec in out["decomposition"]:
            k = dec["top_latents"][0]["latent"]
            conditions[f"{dec['name']}_latent_ablation"] = (dec["name"], k, dec["top_latents"][0]["cosine"])
        rates = evaluate_harmful(
            {c: (lambda s=saes[n], k=k: ablate_latent(model, s, k)) for c, (n, k, _) in conditions.items()}
        )
        for c, (n, k, cos) in conditions.items():
            out["latent_ablation"].append({"sae": n, "latent": k, "cosine": cos, "harmful_refusal": rates[c]})
    # upstream features for the borderline prompts, with an SAE before the direction's layer
    if upstream_sae is None:
        out["upstream_skipped"] = "no SAE before the direction's layer was given"
        return out
    name, sae = Path(upstream_sae).name, load_sae(upstream_sae, d_model=direction.vector.shape[0])
    per_category: dict[str, list[Prompt]] = {}
    for p in borderline:
        per_category.setdefault(p.category or "", []).append(p)
    harmless_acts = max_activation_per_prompt(model, fmt, sae, [p.instruction for p in harmless])
    harmful_acts = max_activation_per_prompt(model, fmt, sae, [p.instruction for p in harmful])
    vocabularies = category_vocabularies(*(vocabulary_prompts or (harmful, harmless)))
    tables = [
        marking_table(model, fmt, sae, [p.instruction for p in ps], vocabularies[""]) for ps in (harmful, harmless)
    ]
    reference_max = torch.cat([t.prompt_max for t in tables])  # for steering sizes
    with_words = []
    for p in borderline:
        vocab = vocabularies.get((p.category or "").removeprefix("borderline:"), vocabularies[""])
        if words := harm_words(p.instruction, vocab):
            with_words.append((p.instruction, words))
    with_words = with_words[:: max(1, len(with_words) // n_mediation_prompts)][:n_mediation_prompts]  # spread out
    out["word_mediation"] = word_mediation(model, fmt, with_words, direction.vector, direction.layer, min_effect=1.0)
    truth: dict[str, tuple[list[PromptAttribution], list[bool] | None]] = {}
    gradients: dict[str, list[RefusalGradient]] = {}
    marked = []
    # Two readings of the gradient: the paper's dot product averaged over all positions, and the
    # attribution (activation × gradient) over the instruction's own tokens, which credits the concepts
    # actually present in the prompt rather than directions the template positions are sensitive to.
    variants = (("dot", "all"), ("attribution", "instruction"))
    for (category, prompts), (score, positions) in (
        (cp, v) for cp in list(per_category.items())[:n_borderline] for v in variants
    ):
        if category not in gradients:  # one backward pass per prompt, shared by both readings and the truth
            n_grad = max(n_category_prompts, n_truth_prompts)
            gradients[category] = category_gradients(model, fmt, [p.instruction for p in prompts[:n_grad]], direction,
                                                     sae)  # fmt: skip
        grads = gradients[category]
        texts = [p.instruction for p in prompts[:n_category_prompts]]
        scores = category_scores(grads[: len(texts)], sae, score, positions)
        res = category_upstream(texts, grads, sae, score, positions, scores=scores)
        entry = res.to_json() | {"category": category, "sae": name, "n_prompts": len(texts)}
        top = res.positive[0]["latent"]
        harm_category = category.removeprefix("borderline:")
        found = [x["latent"] for x in res.positive + res.negative]
        entry["ground_truth"] = category_marking(
            model, fmt, sae, harm_category, harmful, harmless, found, harmless_acts, harmful_acts
        )
        boundary = [p.instruction for p in prompts[:n_boundary_prompts]]
        if category not in truth:  # shared by both readings
            vocab = vocabularies.get(harm_category, vocabularies[""])
            items = [prompt_attribution(fmt, sae, p.instruction, rg, vocab)
                     for p, rg in zip(prompts[:n_truth_prompts], grads)]  # fmt: skip
            truth[category] = (items, refusals(model, tokenizer, fmt, boundary) if steer_multiples else None)
        items, baseline = truth[category]
        entry["word_ground_truth"] = word_ground_truth(items, *tables, scores)
        entry["first_order_check"] = first_order_check(
            model, fmt, texts[0], direction.vector, direction.layer, sae, top, alphas=(0.02, 0.05)
        )
        pair = [res.positive[0]["latent"], res.negative[0]["latent"]]
        if steer_alpha and (score, positions) == variants[-1]:
            steer_texts = [p.instruction for p in prompts[:n_steer_prompts]]
            acts = torch.cat([max_activation_per_prompt(model, fmt, sae, steer_texts), harmful_acts])
            scales = latent_scales(acts, pair)
            entry["steering"] = steering_validation(
                model, tokenizer, fmt, sae, steer_texts, res, steer_alpha, n_latents=1, scales=scales
            )
        if steer_multiples:
            entry["boundary_steering"] = boundary_steering(
                model, tokenizer, fmt, sae, direction.vector, direction.layer, boundary,
                [("top_positive", pair[0], "raise"), ("top_negative", pair[1], "lower")],
                latent_scales(reference_max, pair), multiples=steer_multiples, n_controls=n_controls,
                seed=len(truth), baseline=baseline,
            )  # fmt: skip
        out["upstream"].append(entry)
        marked.append(top)
    from .dashboards import latent_dashboards

    chosen = list(dict.fromkeys(marked))
    corpus = [p.instruction for p in [*harmful[:64], *harmless[:64], *borderline[:64]]]
    out["dashboards"] = latent_dashboards(model, fmt, sae, chosen, corpus, direction.vector)
    return out
