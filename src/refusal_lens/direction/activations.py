"""Mean residual activations at the post-instruction positions, for difference-in-means directions.

One batched forward per batch captures ``resid_pre`` of every layer and the final residual (the last
layer's output, before the final norm) at the last ``n_positions`` prompt tokens. Sums are accumulated
in float64, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.progress import progress_bar
from ..core.prompts import ChatFormatter


@torch.no_grad()
def mean_activations(
    model: nn.Module,
    formatter: ChatFormatter,
    instructions: Sequence[str],
    n_positions: int | None = None,
    batch_size: int = 32,
    desc: str = "activations",
    progress: bool = True,
) -> torch.Tensor:
    """Mean residual stream ``[n_positions, n_layers + 1, d_model]`` (float64) at the last prompt positions.

    Slot ``l < n_layers`` is ``resid_pre`` of layer ``l``; slot ``n_layers`` is the final residual.
    """
    adapter = get_adapter(model)
    n_pos = n_positions or formatter.n_eoi
    L, d = adapter.n_layers, adapter.d_model
    total = torch.zeros(n_pos, L + 1, d, dtype=torch.float64)
    current: dict[int, torch.Tensor] = {}

    def reader(slot: int):
        def fn(x: torch.Tensor) -> None:
            current[slot] = x[:, -n_pos:, :]  # a view; summed once per batch below, not per layer

        return fn

    fns = {(layer, "resid_pre"): reader(layer) for layer in range(L)}
    fns[(L - 1, "resid_post")] = reader(L)
    device = input_device(model)
    with site_hooks(model, fns, adapter):
        bar = progress_bar(total=len(instructions), desc=desc, disable=not progress, leave=False)
        for batch in formatter.batches(instructions, batch_size, device):
            model(**batch, use_cache=False)
            stacked = torch.stack([current[slot].to("cpu") for slot in range(L + 1)], dim=2)  # [B, pos, L+1, d]
            total += stacked.sum(0, dtype=torch.float64)
            bar.update(batch["input_ids"].shape[0])
        bar.close()
    mean = total / len(instructions)
    if not torch.isfinite(mean).all():
        raise UserError(
            "the model produced NaN/inf activations; load it in float32 (--dtype float32) or check its weights."
        )
    return mean
