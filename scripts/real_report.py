"""One HTML report of the three papers on smollm2-safe (issue #16): Arditi et al. (table 2), Kissane et al., Lee et al.

    python scripts/real_report.py --out results/smollm2-safe-report     # from the artifacts in docs/results-16/

The evaluation of table 2 (``table2-safe-forced-results.json``) is the report's main part; the SAE results
(``kissane-l12/kissane.json``, ``lee-l12-to-l23/lee.json``) and the harm-word patching (``item4-word-patching.json``)
fill its "Refusal through the SAE lens" section in the shape ``refusal-lens report`` renders, so the same renderer
that reports on the organism reports on the real model. Writes OUT/results.json (the assembled file), report.html
and figures/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_lens.core.io import atomic_write_json
from refusal_lens.report import build_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results-16"


def sae_lens(kissane: dict, lee: dict, mediation: dict | None) -> dict:
    rates = kissane["latent_ablation"]["rates"]
    ablation = []
    for row in kissane["saes"]:
        k = row["top_latents"][0]["latent"]
        ablation.append({"sae": row["name"], "latent": k, "cosine": row["top_latents"][0]["cosine"],
                         "harmful_refusal": rates[f"{row['name']}_latent_{k}"],
                         "direction_ablation": f"{rates['direction']:.1%}, none: {rates['none']:.1%}"})  # fmt: skip
    settings = {"dot_all": ("dot", "all"), "attribution_instruction": ("attribution", "instruction")}
    upstream = []
    for name, reading in lee["upstream"].items():
        score, positions = settings[name]
        upstream.append({
            "prompt": f"mean over the {len(lee['prompts'])} held-out borderline prompts",
            "value": sum(lee["R"]) / len(lee["R"]),
            "positive": reading["positive"], "negative": reading["negative"],
            "settings": {"score": score, "positions": positions},
        })  # fmt: skip
    decomposition = [row | {"name": f"{row['name']}-data SAE (layer {kissane['layer']})"} for row in kissane["saes"]]
    return {"decomposition": decomposition, "latent_ablation": ablation, "upstream": upstream,
            "dashboards": lee["dashboards"], "word_mediation": mediation or {}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the #16 artifacts")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    read = lambda name: json.loads((args.results / name).read_text())  # noqa: E731
    results = read("table2-safe-forced-results.json")
    mediation = read("item4-word-patching.json") if (args.results / "item4-word-patching.json").is_file() else None
    results["sae_lens"] = sae_lens(read("kissane-l12/kissane.json"), read("lee-l12-to-l23/lee.json"), mediation)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    print(f"wrote {build_report(args.out)}")


if __name__ == "__main__":
    main()
