"""Matplotlib figures of an evaluation (Agg backend, no display needed); each returns PNG bytes.

Example:
    >>> png = refusal_rate_figure(results)          # doctest: +SKIP
    >>> open("rates.png", "wb").write(png)          # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No timestamp metadata, so the same results give the same bytes.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def refusal_rate_figure(results: Mapping[str, Any]) -> bytes:
    """Grouped bars: refusal rate per prompt set (groups) and condition (bars), Wilson 95 % error bars."""
    conds = list(results["conditions"])
    sets = list(results["prompt_sets"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(sets) * max(1, len(conds)) / 2), 3.6))
    width = 0.8 / max(1, len(conds))
    x = np.arange(len(sets))
    for i, cond in enumerate(conds):
        rates = [_num(results["conditions"][cond][s]["refusal_rate"]) for s in sets]
        lo = [r - _num(results["conditions"][cond][s]["ci95"][0]) for r, s in zip(rates, sets)]
        hi = [_num(results["conditions"][cond][s]["ci95"][1]) - r for r, s in zip(rates, sets)]
        ax.bar(x + (i - (len(conds) - 1) / 2) * width, rates, width, yerr=[lo, hi], capsize=3,
               label=cond, color=COLORS[i % len(COLORS)])  # fmt: skip
    ax.set_xticks(x, sets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"refusal rate ({results.get('primary_judge', 'substring')} judge)")
    ax.legend(fontsize=8, ncol=min(4, len(conds)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def category_figure(results: Mapping[str, Any], set_name: str = "harmful") -> bytes | None:
    """Horizontal bars: refusal rate per category of ``set_name`` for each condition (None without categories)."""
    conds = [c for c in results["conditions"] if results["conditions"][c].get(set_name, {}).get("by_category")]
    if not conds:
        return None
    cats = sorted({cat for c in conds for cat in results["conditions"][c][set_name]["by_category"]})
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.32 * len(cats) * max(1, len(conds)) / 1.5)))
    height = 0.8 / len(conds)
    y = np.arange(len(cats))
    for i, cond in enumerate(conds):
        by = results["conditions"][cond][set_name]["by_category"]
        rates = [_num(by[c]["rate"]) if c in by else math.nan for c in cats]
        ax.barh(y + (i - (len(conds) - 1) / 2) * height, rates, height, label=cond, color=COLORS[i % len(COLORS)])
    ax.set_yticks(y, [c if len(c) <= 40 else c[:37] + "..." for c in cats], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"refusal rate on {set_name} prompts")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    ax.grid(axis="x", alpha=0.3)
    return png_bytes(fig)


def candidate_heatmaps(selection: Mapping[str, Any]) -> bytes | None:
    """Layer × position heat maps of the candidates' bypass, induce and KL scores (from ``selection.json``)."""
    cands = selection.get("candidates") or []
    if not cands:
        return None
    positions = sorted({c["position"] for c in cands})
    layers = sorted({c["layer"] for c in cands})
    chosen = selection.get("chosen")
    metrics = [("bypass", "bypass score (lower = better)"), ("induce", "induce score"), ("kl", "KL on harmless")]
    boot = selection.get("bootstrap") or {}
    freq = boot.get("choice_frequency")
    if freq is not None:  # how often each candidate wins when the validation prompts are resampled
        metrics.append(("chosen", f"chosen in % of {boot.get('n_resamples')} bootstrap resamples"))
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.7 * len(metrics), 0.45 * len(positions) + 2.4), layout="constrained"
    )
    for ax, (key, title) in zip(axes, metrics):
        grid = np.full((len(positions), len(layers)), np.nan)
        for c in cands:
            value = 100 * freq.get(f"pos {c['position']} layer {c['layer']}", 0.0) if key == "chosen" else c.get(key)
            grid[positions.index(c["position"]), layers.index(c["layer"])] = _num(value)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")  # blank cells: not scored (e.g. layer 0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set_yticks(range(len(positions)), positions, fontsize=7)
        ax.set_xlabel("layer")
        if chosen:
            ax.scatter([layers.index(chosen["layer"])], [positions.index(chosen["position"])],
                       marker="*", s=160, c="red", edgecolors="white")  # fmt: skip
    axes[0].set_ylabel("position")
    return png_bytes(fig)


def judge_figure(results: Mapping[str, Any]) -> bytes:
    """Refusal rate per judge, condition and prompt set (one panel per set)."""
    sets = list(results["prompt_sets"])
    conds = list(results["conditions"])
    judges = [j["name"] for j in results.get("judges", [])]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), squeeze=False)
    width = 0.8 / max(1, len(judges))
    for ax, s in zip(axes[0], sets):
        x = np.arange(len(conds))
        for i, j in enumerate(judges):
            rates = [_num(results["conditions"][c][s]["judges"].get(j, {}).get("rate")) for c in conds]
            ax.bar(x + (i - (len(judges) - 1) / 2) * width, rates, width, label=j, color=COLORS[i % len(COLORS)])
        ax.set_xticks(x, conds, fontsize=8, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(s, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("refusal rate")
    axes[0][-1].legend(fontsize=8)
    return png_bytes(fig)
