"""Latent dashboards: what makes a latent fire, and how it relates to the refusal direction.

For each chosen latent: the top-activating contexts in a dataset (the token where it fires and a window
of text before it), a histogram of its non-zero activations, and the cosine of its decoder row with r.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from .latents import sae_site


@torch.no_grad()
def latent_dashboards(
    model: nn.Module,
    formatter: ChatFormatter,
    sae: Any,
    latents: Sequence[int],
    prompts: Sequence[str],
    direction: torch.Tensor | None = None,
    top: int = 8,
    window: int = 8,
    bins: int = 20,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One dashboard per latent over the chat-formatted ``prompts`` (padding excluded)."""
    layer, site = sae_site(sae)
    latents = list(latents)
    acts_all: list[torch.Tensor] = []  # per batch: [B, T, n_latents]
    ids_all: list[torch.Tensor] = []
    grab: dict[str, torch.Tensor] = {}
    n_tokens = 0
    device = input_device(model)
    with site_hooks(model, {(layer, site): lambda x: grab.__setitem__("x", x)}):
        for batch in formatter.batches(list(prompts), batch_size, device):
            model(**batch, use_cache=False, logits_to_keep=1)
            f = sae.encode(grab["x"].to(sae.W_dec.dtype))[..., latents].float().cpu()
            mask = batch["attention_mask"].bool().cpu()
            f[~mask] = 0  # padding never counts
            n_tokens += int(mask.sum())
            acts_all.append(f)
            ids_all.append(batch["input_ids"].cpu())
    tok = formatter.tokenizer
    cos = None
    if direction is not None:
        w = sae.W_dec[latents].detach().float().cpu()
        cos = torch.nn.functional.cosine_similarity(w, direction.float().cpu().unsqueeze(0), dim=1)
    out = []
    for j, k in enumerate(latents):
        entries = []  # (activation, batch index, row, position)
        values = []
        for b, f in enumerate(acts_all):
            col = f[..., j]
            values.append(col[col > 0])
            flat = col.flatten()
            n = min(top, int((flat > 0).sum()))
            if n:
                vals, idx = flat.topk(n)
                for v, i in zip(vals.tolist(), idx.tolist()):
                    entries.append((v, b, i // col.shape[1], i % col.shape[1]))
        entries.sort(key=lambda e: -e[0])
        contexts = []
        for v, b, row, pos in entries[:top]:
            ids = ids_all[b][row]
            start = max(0, pos - window)
            contexts.append({
                "activation": v,
                "before": tok.decode(ids[start:pos], skip_special_tokens=False),
                "token": tok.decode(ids[pos : pos + 1], skip_special_tokens=False),
                "after": tok.decode(ids[pos + 1 : pos + 3], skip_special_tokens=False),
            })  # fmt: skip
        nz = torch.cat(values) if values else torch.zeros(0)
        hist = torch.histc(nz, bins=bins, min=0, max=float(nz.max())) if nz.numel() else torch.zeros(bins)
        out.append({
            "latent": int(k),
            "decoder_cosine_with_r": None if cos is None else float(cos[j]),
            "fire_rate": float(nz.numel()) / max(1, n_tokens),
            "histogram": {"counts": hist.tolist(), "max": float(nz.max()) if nz.numel() else 0.0},
            "top_contexts": contexts,
        })  # fmt: skip
    return out
