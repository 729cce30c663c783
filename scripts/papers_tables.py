"""Print the README tables of Kissane et al. and Lee et al. on smollm2-safe from their result files (issue #16).

python scripts/papers_tables.py docs/results-16/kissane-l12/kissane.json docs/results-16/lee-l12-to-l23/lee.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER = {"chat": (0.849, 0.678), "text": (0.596, 0.411)}  # Kissane et al.: reconstruction cosine, best single latent


def kissane_table(k: dict) -> str:
    rates = k["latent_ablation"]["rates"]
    ks = [int(x) for x, _ in k["saes"][0]["sparsity_curve"]]
    shown = [x for x in ks if x in (1, 4, 16, 64, 256)]
    fits = " | ".join(f"error, top-{x} fit" for x in shown)
    head = (
        f"| SAE (layer {k['layer']}, pos {k['position']}) | cos(r_SAE, r) | ‖r_SAE − r‖²/‖r‖² | best single latent | "
        f"{fits} | harmful refusal, latent ablated |"
    )
    lines = [head, "|" + "---|" * (5 + len(shown))]
    for name, (cos, best) in PAPER.items():
        label = "LmSys-Chat-1M" if name == "chat" else "the Pile (chat-wrapped)"
        lines.append(
            f"| Kissane et al., Qwen1.5-0.5B-Chat, {label} | {cos} | — | {best} |"
            + " — |" * len(shown)
            + " bypasses (chat) / falls short (Pile) |"
        )
    for s in k["saes"]:
        curve = dict((int(x), e) for x, e in s["sparsity_curve"])
        latent = s["top_latents"][0]["latent"]
        rate = rates[f"{s['name']}_latent_{latent}"]
        lines.append(
            f"| smollm2-safe, {s['name']} data (latent {latent}) | **{s['cosine']:.3f}** | {s['relative_error']:.3f} | "
            f"**{s['max_single_latent_cosine']:.3f}** | "
            + " | ".join(f"{curve[x]:.3f}" for x in shown)
            + f" | {rate:.2f} |"
        )
    n, t = k["latent_ablation"]["n"], k["latent_ablation"]["max_new_tokens"]
    lines.append(f"\nBaseline harmful refusal {rates['none']:.2f}; r (train-split direction) ablated: "
                 f"{rates['direction']:.2f} (JailbreakBench, n = {n}, {t} tokens).")  # fmt: skip
    return "\n".join(lines)


def lee_first_order(lee: dict) -> str:
    rows = lee["first_order"]["summary"]
    out = ["| α / ‖x‖ | " + " | ".join(str(r["alpha_over_norm"]) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    out.append(
        "| median measured / predicted | "
        + " | ".join(f"{r['median_measured_over_predicted']:.3f}" for r in rows)
        + " |"
    )
    out.append("| median relative error | " + " | ".join(f"{r['median_relative_error']:.1%}" for r in rows) + " |")
    out.append("| Pearson r | " + " | ".join(f"{r['pearson']:.3f}" for r in rows) + " |")
    return "\n".join(out)


def lee_steering(lee: dict) -> str:
    out = ["| reading | latent | multiple (α/‖x‖) | subset (n) | refusal: latent | random | ΔR: latent | random |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, st in lee["steering"].items():
        for r in st["rows"]:
            if "skipped" in r:
                continue
            size = f"{r['multiple']:g} ({r['alpha_over_site_norm']:.2f})"
            out.append(f"| {name} | {r['latent']} ({r['expect']}) | {size} | "
                       f"{r['subset']} ({r['n']}) | {r['refusal_rate']:.2f} | {r['control_refusal_rate']:.2f} | "
                       f"{r['mean_delta_R']:+.1f} | {r['control_mean_delta_R']:+.1f} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    kissane, lee = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    print(kissane_table(kissane), lee_first_order(lee), lee_steering(lee), sep="\n\n")


if __name__ == "__main__":
    main()
