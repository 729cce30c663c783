"""Figures of the SAE-lens analyses: direction decomposition and upstream-feature token saliency (PNG bytes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..lens.mediation import GROUPS
from .figures import COLORS, plt, png_bytes


def decomposition_figure(saes: Sequence[Mapping[str, Any]]) -> bytes:
    """Sparsity curves (top-k by |Δf̄| solid, OMP dashed) of several SAEs, with their cosine in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(saes):
        color = COLORS[i % len(COLORS)]
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
    return png_bytes(fig)


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
    return png_bytes(fig)


def _esc(x: Any) -> str:
    import html

    return html.escape(str(x), quote=True)


def lens_section(lens: Mapping[str, Any], figure_tags: str = "") -> str:
    """HTML for results["sae_lens"]: decomposition table, upstream latents, latent dashboards (all escaped)."""
    parts = ["<h2>Refusal through the SAE lens</h2>"]
    dec = lens.get("decomposition") or []
    if dec:
        rows = "".join(
            f"<tr><td>{_esc(d['name'])}</td><td>{d['cosine']:.3f}</td><td>{d['relative_error']:.3f}</td>"
            f"<td>{d['max_single_latent_cosine']:.3f}</td><td>{_esc(d.get('latents_for_half_error'))}</td></tr>"
            for d in dec
        )
        parts.append(
            "<p class='meta'>Kissane et al.: r̂_SAE = mean SAE(harmful) − mean SAE(harmless); paper figures: "
            "chat-data SAE cosine 0.85 vs 0.60 (Pile), best single latent 0.68 vs 0.41.</p>"
            "<table><tr><th>SAE</th><th>cosine(r̂_SAE, r)</th><th>relative error</th>"
            f"<th>max single-latent cosine</th><th>latents for error ≤ 0.5</th></tr>{rows}</table>"
        )
    parts.append(figure_tags)
    for item in lens.get("latent_ablation") or []:
        parts.append(
            f"<p class='meta'>Ablating latent {_esc(item['latent'])} of {_esc(item['sae'])} (cosine "
            f"{item['cosine']:.2f} with r): harmful refusal {item['harmful_refusal']:.1%} "
            f"(ablating r: {_esc(item.get('direction_ablation'))}).</p>"
        )
    for up in lens.get("upstream") or []:
        pos = ", ".join(f"{_esc(x['latent'])} ({x['score']:+.3g})" for x in up["positive"][:5])
        neg = ", ".join(f"{_esc(x['latent'])} ({x['score']:+.3g})" for x in up["negative"][:5])
        parts.append(
            f"<h3>Upstream of refusal: {_esc(up['prompt'])}</h3><p class='meta'>"
            f"{_esc(up.get('settings', {}).get('score'))} over {_esc(up.get('settings', {}).get('positions'))} "
            f"positions; R = {up['value']:.3f}; "
            f"towards refusal: {pos}; against: {neg}</p>"
        )
    med = lens.get("word_mediation") or {}
    if med.get("n_prompts"):
        rows = "".join(
            f"<tr><td>{_esc(x['layer'])}</td>" + "".join(f"<td>{x['shares'][g]:.0%}</td>" for g in GROUPS) + "</tr>"
            for x in med["layers"]
        )
        parts.append(
            f"<h3>Where the harm word's effect on refusal passes</h3><p class='meta'>{med['n_prompts']} borderline "
            f"prompts; swapping the harm word for a neutral word lowers R from {med['mean_R']:.2f} to "
            f"{med['mean_R_swapped']:.2f}. Share of that drop recovered by patching the swapped run's activations "
            "at resid_pre[layer] into only these positions (an upstream latent can act only where the effect "
            "passes):</p><table><tr><th>layer</th><th>harm-word tokens</th><th>other instruction tokens</th>"
            f"<th>template tokens</th></tr>{rows}</table>"
        )
    for dash in lens.get("dashboards") or []:
        ctx = "".join(
            f"<li>{c['activation']:.2f}: {_esc(c['before'])}<mark>{_esc(c['token'])}</mark>{_esc(c['after'])}</li>"
            for c in dash["top_contexts"]
        )
        cos = dash.get("decoder_cosine_with_r")
        parts.append(
            f"<h3>Latent {_esc(dash['latent'])}</h3><p class='meta'>fires on {dash['fire_rate']:.2%} of tokens; "
            f"decoder cosine with r {'-' if cos is None else f'{cos:.3f}'}; activation histogram "
            f"{_esc([round(c) for c in dash['histogram']['counts']])} (0..{dash['histogram']['max']:.2f})</p>"
            f"<ol class='contexts'>{ctx}</ol>"
        )
    return "".join(parts)
