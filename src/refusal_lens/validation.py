"""Validating upstream latents by steering: add ±α·W_dec[k] at the SAE's layer and measure refusal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .generation import GenerationSettings, generate
from .latents import add_latent
from .prompts import ChatFormatter
from .scoring import is_refusal_text


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
) -> list[dict[str, Any]]:
    """Refusal rate of greedy replies when steering with each of the top positive (+α) and negative (−α) latents."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rows = []

    def rate(factory: Any) -> tuple[float, str]:
        comps = generate(model, tokenizer, list(prompts), factory, settings, formatter=formatter, progress=False)
        return sum(is_refusal_text(c.completion) for c in comps) / len(comps), comps[0].completion

    base, example = rate(None)
    rows.append({"latent": None, "alpha": 0.0, "refusal_rate": base, "example": example})
    for sign, items in ((+1, result.positive[:n_latents]), (-1, result.negative[:n_latents])):
        for item in items:
            k = item["latent"]
            r, example = rate(lambda k=k, a=sign * alpha: add_latent(model, sae, k, a, positions="prompt"))
            rows.append({"latent": k, "alpha": sign * alpha, "refusal_rate": r, "example": example})
    return rows
