"""The SAE-lens analyses of the demo: decomposition, latent ablation, upstream features, dashboards.

:func:`run_sae_lens` turns the two SAE papers into one call on a model, a direction and a set of SAEs:

1. decompose the direction with every SAE (Kissane et al.) and compare them;
2. ablate each SAE's most r-aligned latent and measure harmful refusal (next to ablating r itself);
3. for borderline prompts (benign, but reusing a harm category's words), find the latents of an SAE
   before the direction's layer that are upstream of refusal (Lee, Breck, Arditi), and check the
   *planted ground truth*: does the top upstream latent mark that category's words? Measured by the
   AUROC of the latent's max activation over a prompt's instruction tokens, separating harmful prompts
   of that category from harmless prompts;
4. dashboards for the latents found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Prompt
from .decompose import decompose_direction, latents_for_error
from .direction import Direction
from .hooks import site_hooks
from .latents import ablate_latent, sae_site
from .models import input_device
from .prompts import ChatFormatter
from .upstream import first_order_check, upstream_features


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


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
) -> dict[str, Any]:
    """AUROC of each latent (and the best latent overall) for "harmful prompt of ``category``" vs harmless."""
    pos = [p.instruction for p in harmful if p.category == category]
    neg = [p.instruction for p in harmless]
    a_pos = max_activation_per_prompt(model, formatter, sae, pos)
    a_neg = max_activation_per_prompt(model, formatter, sae, neg)
    scores = {int(k): auroc(a_pos[:, k], a_neg[:, k]) for k in latents}
    # the best single latent for this category, for scale
    mean_gap = a_pos.mean(0) - a_neg.mean(0)
    best = int(mean_gap.argmax())
    return {
        "category": category, "n_pos": len(pos), "n_neg": len(neg), "auroc": scores,
        "best_latent": best, "best_latent_auroc": auroc(a_pos[:, best], a_neg[:, best]),
    }  # fmt: skip


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
    n_borderline: int = 4,
) -> dict[str, Any]:
    """Run the analyses above; ``evaluate_harmful(conditions) -> {name: refusal rate}`` measures ablations."""
    from .sae.formats import load_sae

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
    per_category: dict[str, Prompt] = {}
    for p in borderline:
        per_category.setdefault(p.category or "", p)
    marked = []
    # Two readings of the gradient: the paper's dot product averaged over all positions, and the
    # attribution (activation × gradient) over the instruction's own tokens, which credits the concepts
    # actually present in the prompt rather than directions the template positions are sensitive to.
    variants = (("dot", "all"), ("attribution", "instruction"))
    for (category, prompt), (score, positions) in (
        (cp, v) for cp in list(per_category.items())[:n_borderline] for v in variants
    ):
        res = upstream_features(model, fmt, prompt.instruction, direction.vector, direction.layer, sae,
                                score=score, positions=positions, top=5)  # fmt: skip
        entry = res.to_json() | {"category": category, "sae": name}
        top = res.positive[0]["latent"]
        harm_category = category.removeprefix("borderline:")
        found = [x["latent"] for x in res.positive + res.negative]
        entry["ground_truth"] = category_marking(model, fmt, sae, harm_category, harmful, harmless, found)
        entry["first_order_check"] = first_order_check(
            model, fmt, prompt.instruction, direction.vector, direction.layer, sae, top, alphas=(0.05, 0.1)
        )
        out["upstream"].append(entry)
        marked.append(top)
    from .dashboards import latent_dashboards

    chosen = list(dict.fromkeys(marked))
    corpus = [p.instruction for p in [*harmful[:64], *harmless[:64], *borderline[:64]]]
    out["dashboards"] = latent_dashboards(model, fmt, sae, chosen, corpus, direction.vector)
    return out
