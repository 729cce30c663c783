"""The prompts' shared first tokens, run once per scored point instead of once per prompt.

Every formatted prompt starts with the same tokens: the chat template's opening and, with ``--system``, the whole
system message (SmolLM2 inserts a default one). The search scores hundreds of points on the same prompts, so
:class:`SharedPrefix` runs those ``P`` tokens once per point (batch 1) and feeds their keys and values, repeated
over the batch, to a forward pass of only the rest of each prompt. The rest is left-padded *after* the prefix
(masked), with positions that continue from ``P``, so every real token sees exactly what it saw before: only the
order of float additions changes. :class:`~.objectives.Evaluator` checks that on the unedited model at start-up
and falls back to whole prompts where it does not hold (a family whose forward or cache differs).

Example:
    >>> prefix = SharedPrefix(fmt.token_ids(prompts[0])[:n_shared], "cpu")  # doctest: +SKIP
    >>> batch = prefix.batch([fmt.token_ids(p) for p in prompts], pad_id=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..core.models import cache_argument
from ..core.prompts import position_ids

KV = list[tuple[torch.Tensor, torch.Tensor]]


class SharedPrefix:
    """The common opening's token ids ``[1, P]``, and the batches and caches that continue from it."""

    def __init__(self, ids: Sequence[int], device: torch.device | str):
        self.ids = torch.tensor([list(ids)], device=device)

    def __len__(self) -> int:
        return self.ids.shape[1]

    def batch(self, rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
        """The rows without the prefix, left-padded; the mask covers prefix + rest, positions continue from P."""
        P, rests = len(self), [list(r)[len(self) :] for r in rows]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rests], device=self.ids.device)
        rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=self.ids.device)
        mask = torch.cat([torch.ones(len(rows), P, dtype=rest_mask.dtype, device=rest_mask.device), rest_mask], 1)
        positions = P + position_ids(rest_mask)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def keys_values(
        self, model: nn.Module, n_layers: int, inputs: dict | None = None, cache=None, differentiable: bool = False
    ) -> KV:
        """Per layer, the prefix's keys and values ([1, heads, P, head_dim]); ``inputs`` replaces the token ids
        (e.g. ``inputs_embeds`` for a run of the last layers only), and layers the run skips come back empty.
        ``cache``: an empty one made beforehand (a cache made while the layer list is cut has too few layers).
        ``differentiable``: keep the autograd graph (the gradient search backpropagates into the opening)."""
        cache = DynamicCache(config=model.config) if cache is None else cache
        inputs = inputs or {"input_ids": self.ids}
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            model(**inputs, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
        out = []
        for layer in cache.layers[:n_layers]:
            ok = getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel()
            out.append((layer.keys, layer.values) if ok else (torch.empty(0), torch.empty(0)))
        return out

    @staticmethod
    def cache(model: nn.Module, kv: KV, batch_size: int) -> DynamicCache:
        """A fresh cache holding the prefix for every row of a batch (a forward pass appends to it); make it
        before cutting the layer list, as it takes every layer's type from the config."""
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1), i)
        return cache
