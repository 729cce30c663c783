"""SAE latents as interventions: where an SAE reads, and steering with its latents.

* :func:`sae_site` — the ``(layer, site)`` an SAE was trained on, from its metadata.
* :func:`ablate_latent` — ablate a latent's decoder direction everywhere, like the refusal direction.
* :func:`add_latent` — add ``α·W_dec[k]`` at the SAE's site at chosen positions.
* :func:`clamp_latent` — splice the SAE in at its site and set latent ``k``'s activation to a value,
  keeping everything the SAE does not reconstruct (``x ← x + (c − f_k(x))·W_dec[k]``).

All are context managers usable with the evaluation layer (refusal rates, generations).

Example:
    >>> with add_latent(model, sae, 123, alpha=8.0, positions="prompt"):   # doctest: +SKIP
    ...     completions = generate(model, tok, prompts)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..direction.interventions import Positions, ablate_direction, adder, apply_direction

_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)")


def sae_site(sae: Any, layer: int | None = None, site: str | None = None) -> tuple[int, str]:
    """The SAE's ``(layer, site)``: given values win, else its metadata (``layer``/``site`` or ``hook_name``)."""
    meta = getattr(sae, "metadata", None) or {}
    m = _HOOK.fullmatch(str(meta.get("hook_name") or ""))
    if layer is None:
        layer = meta.get("layer") if meta.get("layer") is not None else (int(m.group(1)) if m else None)
    if site is None:
        site = meta.get("site") or (m.group(2) if m else None)
    if layer is None or site is None:
        raise UserError("the SAE does not record its layer/site (metadata hook_name); pass --layer and --site.")
    return int(layer), str(site)


def decoder_row(sae: Any, latent: int) -> torch.Tensor:
    """``W_dec[latent]`` as a detached float32 vector, with a clear error for an out-of-range index."""
    if not 0 <= latent < sae.W_dec.shape[0]:
        raise UserError(f"latent {latent} is out of range; this SAE has latents 0..{sae.W_dec.shape[0] - 1}.")
    return sae.W_dec[latent].detach().float()


@contextmanager
def ablate_latent(model: nn.Module, sae: Any, latent: int) -> Iterator[None]:
    """Directional ablation of the latent's decoder direction at every layer and residual write."""
    with ablate_direction(model, decoder_row(sae, latent)):
        yield


@contextmanager
def add_latent(
    model: nn.Module,
    sae: Any,
    latent: int,
    alpha: float,
    positions: Positions = "all",
    layer: int | None = None,
    site: str | None = None,
) -> Iterator[None]:
    """Add ``alpha·W_dec[latent]`` at the SAE's site (or the given layer/site) at ``positions``."""
    at = sae_site(sae, layer, site)
    with apply_direction(model, decoder_row(sae, latent), adder(alpha), [at], positions):
        yield


@contextmanager
def clamp_latent(
    model: nn.Module, sae: Any, latent: int, value: float, layer: int | None = None, site: str | None = None
) -> Iterator[None]:
    """Set latent ``latent`` to ``value`` through the spliced SAE at every position (error term kept)."""
    at = sae_site(sae, layer, site)
    row = decoder_row(sae, latent)

    def clamp(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = sae.encode(x.to(sae.W_dec.dtype))[..., latent : latent + 1]
        return x + ((value - f) * row.to(f.device)).to(x.dtype)

    with site_hooks(model, {at: clamp}):
        yield
