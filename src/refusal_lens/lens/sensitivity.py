"""How stable are the upstream features? Overlap of top-k latent sets when one setting changes.

Varies the target layer, the target position (each post-instruction token), the source layer (when
SAEs at several layers are given) and the prompt (paraphrases), and reports the Jaccard overlap of each
variant's top-k positive latents with the reference setting's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.prompts import ChatFormatter
from .upstream import upstream_features


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(1, len(sa | sb))


def sensitivity(
    model: nn.Module,
    formatter: ChatFormatter,
    prompt: str,
    direction: torch.Tensor,
    target_layer: int,
    sae: Any,
    paraphrases: Sequence[str] = (),
    extra_saes: Sequence[Any] = (),
    top: int = 10,
    score: str = "dot",
) -> dict[str, list[dict[str, Any]]]:
    """Top-k overlap with the reference run for each varied setting."""

    def top_set(**kw: Any) -> list[int]:
        args = dict(prompt=prompt, target_layer=target_layer, sae=sae, top=top, score=score) | kw
        res = upstream_features(model, formatter, args.pop("prompt"), direction, args.pop("target_layer"), **args)
        return [x["latent"] for x in res.positive]

    ref = top_set()
    from .latents import sae_site

    source_layer, _ = sae_site(sae)
    n_layers = get_adapter(model).n_layers
    out: dict[str, list[dict[str, Any]]] = {
        "target_layer": [],
        "target_position": [],
        "paraphrase": [],
        "source_layer": [],
    }
    for layer in range(source_layer + 1, n_layers):
        if layer != target_layer:
            out["target_layer"].append({"value": layer, "overlap": jaccard(ref, top_set(target_layer=layer))})
    for pos in range(-formatter.n_eoi, 0):
        if pos != -1:
            out["target_position"].append({"value": pos, "overlap": jaccard(ref, top_set(target_position=pos))})
    for text in paraphrases:
        out["paraphrase"].append({"value": text, "overlap": jaccard(ref, top_set(prompt=text))})
    for other in extra_saes:
        layer, _ = sae_site(other)
        if layer < target_layer and other.W_dec.shape == sae.W_dec.shape:
            # different SAEs have different latent bases: compare through decoder cosine to the reference's
            res = top_set(sae=other)
            sim = torch.nn.functional.cosine_similarity(
                sae.W_dec[ref].detach().unsqueeze(1), other.W_dec[res].detach().unsqueeze(0), dim=-1
            )
            out["source_layer"].append({"value": layer, "mean_best_cosine": float(sim.max(1).values.mean())})
    return out
