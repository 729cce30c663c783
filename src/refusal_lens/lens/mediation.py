"""Where a word's effect on refusal passes, layer by layer (activation patching).

The planted ground truth of the upstream-feature method says a borderline prompt is refused *because of*
its harm word. Two measurements make that claim concrete before any SAE is read:

1. **Is the word causal?** Swap the harm word for a neutral word of the same token length and measure
   the drop of ``R = ⟨resid[L][target], r̂⟩`` (:func:`swap_words`, :func:`word_mediation`).
2. **Where does its effect pass?** Run the swapped ("corrupt") prompt, then the original with the corrupt
   activations patched in at ``resid_pre[l]`` on one group of positions only: the harm word's own tokens,
   the other instruction tokens, or the chat template's tokens. The share of the drop that a group
   recovers, ``(R_clean − R_patched) / (R_clean − R_corrupt)``, is how much of the word's effect on R
   passes through those positions at layer l.

A latent that marks the word's tokens can only be upstream of refusal at layer l if the word-token group
carries the effect there. At ``resid_pre[0]`` (the embeddings) only the swapped tokens differ, so that
group recovers exactly 1 and the others exactly 0; from there on, attention moves the effect wherever the
model reads it.

Example::

    >>> rows = word_mediation(model, fmt, [("How do I clean a water gun?", ["gun"])], r, 5)  # doctest: +SKIP
    >>> rows["layers"][3]["shares"]["template"]  # doctest: +SKIP
    0.98
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from .ground_truth import word_token_mask
from .upstream import instruction_mask

# Neutral stand-ins, tried in order until one keeps the prompt's token count (positions must line up).
NEUTRAL_WORDS = ("thing", "box", "book", "plant", "lamp", "chair", "table", "cup")
GROUPS = ("word", "instruction", "template")


def swap_words(
    formatter: ChatFormatter, prompt: str, words: Sequence[str], replacements: Sequence[str] = NEUTRAL_WORDS
) -> str | None:
    """``prompt`` with every whole-word occurrence of ``words`` replaced by one neutral word.

    Returns the first replacement that leaves the formatted prompt's token count unchanged, or ``None``.
    """
    if not words:
        return None
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", flags=re.IGNORECASE)
    n_tokens = len(formatter.token_ids(prompt))
    for neutral in replacements:
        swapped = pattern.sub(neutral, prompt)
        if swapped == prompt:
            return None
        if len(formatter.token_ids(swapped)) == n_tokens:
            return swapped
    return None


def position_groups(formatter: ChatFormatter, prompt: str, words: Sequence[str]) -> dict[str, torch.Tensor]:
    """``[T]`` masks that partition the formatted prompt: the words' tokens, other instruction tokens, template."""
    instruction = instruction_mask(formatter, prompt, formatter.token_ids(prompt))
    word = word_token_mask(formatter, prompt, words) & instruction
    return {"word": word, "instruction": instruction & ~word, "template": ~instruction}


@torch.no_grad()
def _run(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    unit: torch.Tensor,
    target_layer: int,
    target_position: int,
    record: Sequence[int] = (),
    patches: Sequence[tuple[int, torch.Tensor, torch.Tensor]] = (),
) -> tuple[list[float], dict[int, torch.Tensor]]:
    """R of each prompt, in one batched forward (the prompts must have the same token count).

    ``record``: keep the first prompt's ``resid_pre[l]`` at these layers. ``patches[i] = (layer, values, mask)``:
    in row i, replace ``resid_pre[layer]`` by ``values`` where ``mask`` is True.
    """
    batch = formatter.encode(list(prompts), input_device(model))
    state: dict[str, Any] = {"acts": {}}
    by_layer: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for row, (layer, values, mask) in enumerate(patches):
        by_layer.setdefault(layer, []).append((row, values, mask))

    def read(x: torch.Tensor) -> None:
        state["R"] = (x[:, target_position].double().cpu() @ unit).tolist()

    def keep(layer: int) -> Any:
        return lambda x: state["acts"].__setitem__(layer, x[0].detach().clone())

    def put(layer: int) -> Any:
        def patch(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            for row, values, mask in by_layer[layer]:
                m = mask.to(x.device)
                x[row, m] = values.to(x.device, x.dtype)[m]
            return x

        return patch

    fns: dict[tuple[int, str], list[Any]] = {}
    for layer in record:
        fns.setdefault((layer, "resid_pre"), []).append(keep(layer))
    for layer in by_layer:  # after keep: a recorded activation is the unpatched one
        fns.setdefault((layer, "resid_pre"), []).append(put(layer))
    fns.setdefault((target_layer, "resid_pre"), []).append(read)
    with site_hooks(model, fns):
        model(**batch, use_cache=False, logits_to_keep=1)
    return state["R"], state["acts"]


def word_mediation(
    model: nn.Module,
    formatter: ChatFormatter,
    items: Sequence[tuple[str, Sequence[str]]],
    direction: torch.Tensor,
    target_layer: int,
    layers: Sequence[int] | None = None,
    target_position: int = -1,
    min_effect: float = 0.0,
    batch_size: int = 24,
) -> dict[str, Any]:
    """Patch the word-swapped run into the original at each layer and position group (module doc).

    ``items`` are ``(prompt, harm_words)`` pairs. Prompts whose words cannot be swapped at equal token length,
    or whose swap lowers R by ``min_effect`` or less, are skipped (and counted). Returns the mean R before and
    after the swap and, per layer ``l < target_layer``, the mean share of the drop each group recovers.
    The patched runs of a prompt go through the model ``batch_size`` at a time.
    """
    layers = list(range(target_layer)) if layers is None else list(layers)
    if any(not 0 <= layer < target_layer for layer in layers):
        raise UserError(f"mediation layers must lie in 0..{target_layer - 1} (before the target layer).")
    unit = (direction / direction.norm()).double().cpu()
    shares: dict[int, dict[str, list[float]]] = {layer: {g: [] for g in GROUPS} for layer in layers}
    clean_r, corrupt_r, skipped = [], [], {"no_swap": 0, "small_effect": 0}
    for prompt, words in items:
        swapped = swap_words(formatter, prompt, words)
        if swapped is None:
            skipped["no_swap"] += 1
            continue
        (r_clean,), _ = _run(model, formatter, [prompt], unit, target_layer, target_position)
        (r_corrupt,), acts = _run(model, formatter, [swapped], unit, target_layer, target_position, record=layers)
        effect = r_clean - r_corrupt
        if effect <= min_effect or effect == 0.0:
            skipped["small_effect"] += 1
            continue
        clean_r.append(r_clean)
        corrupt_r.append(r_corrupt)
        groups = position_groups(formatter, prompt, words)
        plan = [(layer, name) for layer in layers for name in GROUPS]
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            patches = [(layer, acts[layer], groups[name]) for layer, name in chunk]
            patched, _ = _run(model, formatter, [prompt] * len(chunk), unit, target_layer, target_position,
                              patches=patches)  # fmt: skip
            for (layer, name), r_patched in zip(chunk, patched):
                shares[layer][name].append((r_clean - r_patched) / effect)
    n = len(clean_r)
    return {
        "n_prompts": n,
        "skipped": skipped,
        "min_effect": min_effect,
        "mean_R": sum(clean_r) / n if n else float("nan"),
        "mean_R_swapped": sum(corrupt_r) / n if n else float("nan"),
        "layers": [
            {"layer": layer, "shares": {g: (sum(v) / n if n else float("nan")) for g, v in shares[layer].items()}}
            for layer in layers
        ],
    }
