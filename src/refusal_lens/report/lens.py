"""Figures of the SAE-lens analyses: direction decomposition and upstream-feature token saliency (PNG bytes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .figures import _COLORS, _png, plt


def decomposition_figure(saes: Sequence[Mapping[str, Any]]) -> bytes:
    """Sparsity curves (top-k by |Δf̄| solid, OMP dashed) of several SAEs, with their cosine in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(saes):
        color = _COLORS[i % len(_COLORS)]
        ks, errs = zip(*s["sparsity_curve"]) if s["sparsity_curve"] else ((), ())
        ax.plot(
            ks,
            errs,
            "-o",
            color=color,
            ms=3,
            label=f"{s['name']}: cos {s['cosine']:.2f}, best latent {s['max_single_latent_cosine']:.2f}",
        )
        if s.get("omp_curve"):
            ks, errs = zip(*s["omp_curve"])
            ax.plot(ks, errs, "--", color=color, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latents used (k)")
    ax.set_ylabel("relative error ‖fit − r‖² / ‖r‖²")
    ax.set_ylim(0, 1.05)
    ax.set_title("Reconstructing the refusal direction from SAE latents (dashed: OMP)")
    ax.legend(fontsize=7)
    return _png(fig)


def saliency_figure(tokens: Sequence[str], values: Sequence[float]) -> bytes:
    """One row of coloured tokens: where the refusal gradient enters (gradient × input)."""
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * n), 1.3))
    vmax = max(1e-12, max(abs(v) for v in values))
    ax.imshow([list(values)], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_yticks([])
    ax.set_xticks(range(n))
    ax.set_xticklabels([t.replace("Ġ", "␣").replace("Ċ", "⏎") for t in tokens], rotation=70, fontsize=7)
    ax.set_title("gradient × input of R per token (red: towards refusal)", fontsize=8)
    return _png(fig)
