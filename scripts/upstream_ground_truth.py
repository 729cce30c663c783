"""The organism's planted ground truth for features upstream of refusal (Lee, Breck, Arditi 2025), per category.

    python scripts/upstream_ground_truth.py [--per-scenario 4] [--controls 3] [--multiples 1 2 4 16]
                                            [--categories weapons drugs ...] [--json OUT]

(about 4 minutes on 2 CPU cores for all ten categories.) Uses the shipped organism, its refusal direction
(layer 5) and its upstream SAE (chat data, layer 3). For every borderline category:

* prompts: ``--per-scenario`` phrasings of each of the category's 8 borderline scenarios, from all splits,
  so that every scenario (e.g. "clean a water gun after the summer", a training scenario) is covered;
* harm words: a prompt's words that occur in a harmful training prompt of the category and in no harmless
  training prompt (function words excluded; whole words, so "gunpowder" is not "gun");
* readings of the refusal gradient, each the mean over the prompts: ``dot/all`` (the paper's),
  ``attribution/all`` and ``attribution/instruction`` (activation × gradient, over all positions or the
  instruction's tokens), plus ``top_at_word``, the latent with the largest attribution at the harm words;
* ground truth for each reading's top latent (see :mod:`refusal_lens.lens.validation`): AUROCs on the harmful
  and harmless val+test prompts (``wt`` fires on the word's tokens vs harmless tokens, ``pr`` marks prompts
  with the word vs harmless prompts, ``sp`` vs harmful prompts without the word), the on-word rate (its
  attribution peaks on the harm word; ``n`` prompts where it fires on the instruction) and, for scale, the
  same numbers averaged over every latent active on the prompts (``random``);
* steering on the category's val+test borderline prompts: the top positive latent and the top-at-word latent
  on the prompts answered at baseline, the top negative latent on the prompts refused at baseline, each at
  ``--multiples`` × its mean firing activation (added at the prompt's positions), next to ``--controls``
  random latents of the same size: refusal rate (greedy, 32 new tokens, substring judge) and mean change
  of R = <resid_5[last], r̂>;
* where the harm word's effect passes (:mod:`refusal_lens.lens.mediation`): on the val+test borderline prompts with
  harm words, swap the words for a neutral word of the same token length (kept if R drops by >= 1) and patch
  the swapped run into the original at resid_pre[l] on the word's tokens, the other instruction tokens or
  the template: the share of the drop each recovers, per layer, and how many refusals the swap removes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from refusal_lens.core.data import Prompt  # noqa: E402
from refusal_lens.core.models import load_model  # noqa: E402
from refusal_lens.core.prompts import ChatFormatter  # noqa: E402
from refusal_lens.direction.compute import Direction  # noqa: E402
from refusal_lens.lens.ground_truth import (  # noqa: E402
    MarkingTable,
    PromptAttribution,
    harm_words,
    marking_table,
    prompt_attribution,
    word_ground_truth,
)
from refusal_lens.lens.mediation import swap_words, word_mediation  # noqa: E402
from refusal_lens.lens.pipeline import category_gradients, category_scores, category_vocabularies  # noqa: E402
from refusal_lens.lens.upstream import RefusalGradient  # noqa: E402
from refusal_lens.lens.validation import (  # noqa: E402
    boundary_steering,
    latent_scales,
    refusals,
)
from refusal_lens.organism import chat_pairs, load_split, shipped_direction, shipped_saes  # noqa: E402
from refusal_lens.sae.formats import load_sae  # noqa: E402

READINGS = (("dot", "all"), ("attribution", "all"), ("attribution", "instruction"))


def split_prompts(kind: str, splits: tuple[str, ...]) -> list[Prompt]:
    return [Prompt(r["instruction"], r["category"]) for s in splits for r in load_split(kind, s)]


def scenario_prompts(per_scenario: int) -> dict[str, list[str]]:
    """``per_scenario`` phrasings of every borderline scenario (all splits), by category."""
    by_scenario: dict[str, list[str]] = defaultdict(list)
    for split in ("train", "val", "test"):
        for c in chat_pairs(split):
            if c["kind"] == "borderline":
                by_scenario[c["template"].split("|")[0]].append(c["instruction"])
    out: dict[str, list[str]] = defaultdict(list)
    for key in sorted(by_scenario):
        category = "borderline:" + key.split(":")[1]
        out[category] += by_scenario[key][:per_scenario]
    return out


def category_report(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormatter,
    sae: Any,
    direction: Direction,
    items: list[PromptAttribution],
    grads: list[RefusalGradient],
    steer: list[str],
    tables: tuple[MarkingTable, MarkingTable],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    reference_max = torch.cat([t.prompt_max for t in tables])
    baseline = refusals(model, tokenizer, fmt, steer)
    out: dict[str, Any] = {"n_steer_prompts": len(steer), "baseline_refusal_rate": sum(baseline) / len(baseline)}
    for score, positions in READINGS:
        scores = category_scores(grads, sae, score, positions)
        truth = word_ground_truth(items, *tables, scores)
        roles = {x["role"]: x["latent"] for x in truth.get("latents", [])}
        roles.setdefault("top_positive", int(scores.argmax()))
        roles.setdefault("top_negative", int(scores.argmin()))
        plan = [("top_positive", roles["top_positive"], "raise"), ("top_negative", roles["top_negative"], "lower")]
        if "top_at_word" in roles:
            plan.append(("top_at_word", roles["top_at_word"], "raise"))
        scales = latent_scales(reference_max, [k for _, k, _ in plan])
        steering = boundary_steering(
            model, tokenizer, fmt, sae, direction.vector, direction.layer, steer, plan, scales,
            multiples=args.multiples, n_controls=args.controls, seed=seed, baseline=baseline,
        )  # fmt: skip
        out[f"{score}/{positions}"] = {"word_ground_truth": truth, "boundary_steering": steering}
    return out


def cell(x: Any) -> str:
    """A table cell: floats with 2 decimals, NaN/None as '-'."""
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[cell(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    print(f"\n== {title} ==")
    for r in cells:
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))


def role(truth: dict[str, Any], name: str) -> dict[str, Any]:
    return next(x for x in truth["latents"] if x["role"] == name)


def print_tables(report: dict[str, Any]) -> None:
    readings = [f"{s}/{p}" for s, p in READINGS]
    rows = []
    for cat, rep in report.items():
        g = rep["dot/all"]["word_ground_truth"]
        if not g.get("latents"):
            rows.append([cat, g["n_prompts"], 0, "(none)"])
            continue
        sh, at = g["attribution_share"], role(g, "top_at_word")
        ranks = "/".join(str(role(rep[r]["word_ground_truth"], "top_at_word")["rank"]) for r in readings)
        rows.append([cat, g["n_prompts"], g["n_with_harm_words"], ",".join(g["words"]), sh["harm_word"],
                     sh["other_instruction"], sh["template"], at["latent"], at["word_token_auroc"], at["prompt_auroc"],
                     at["specificity_auroc"], at["on_word_rate"], g["chance_on_word"], ranks])  # fmt: skip
    table(
        "Where the gradient enters (share of |attribution|) and the latent with the largest attribution at the word",
        ["category", "n", "with words", "harm words", "share word", "instr", "template", "at-word latent", "wt",
         "pr", "sp", "on-word", "chance", "its rank dot/att-all/att-instr"],
        rows,
    )  # fmt: skip
    rows = []
    for cat, rep in report.items():
        for reading in readings:
            g = rep[reading]["word_ground_truth"]
            if not g.get("latents"):
                rows.append([cat, reading, "(no harm word)"])
                continue
            top, neg, rb = role(g, "top_positive"), role(g, "top_negative"), g["random_baseline"]
            best = f"{top['best_word']['word']} ({cell(top['best_word']['word_token_auroc'])})"
            rows.append([cat, reading, top["latent"], best, top["word_token_auroc"], top["prompt_auroc"],
                         top["specificity_auroc"], top["on_word_rate"], top["n_prompts_active"],
                         rb["word_token_auroc"], rb["prompt_auroc"], rb["specificity_auroc"], rb["on_word_rate"],
                         neg["latent"], neg["word_token_auroc"], neg["prompt_auroc"],
                         neg["specificity_auroc"]])  # fmt: skip
    table(
        "Top upstream latent of each reading vs the harm words (random: mean over latents active on the prompts)",
        ["category", "reading", "top+", "best word (wt)", "wt", "pr", "sp", "on-word", "n fires", "random wt", "pr",
         "sp", "on-word", "top-", "wt", "pr", "sp"],
        rows,
    )  # fmt: skip
    rows = []
    for cat, rep in report.items():
        for reading in readings:
            steer = rep[reading]["boundary_steering"]["rows"]
            for name in dict.fromkeys(r["role"] for r in steer):
                mine = [r for r in steer if r["role"] == name]
                first = mine[0]
                size = first["alpha_over_site_norm"] / first["multiple"]
                row = [cat, reading, name, first["latent"], first["subset"], first["n"], size]
                for r in mine:
                    row += ["-", "-"] if "skipped" in r else [
                        f"{r['refusal_rate']:.2f} [{r['control_refusal_rate']:.2f}]",
                        f"{r['mean_delta_R']:+.2f} [{r['control_mean_delta_R']:+.2f}]",
                    ]  # fmt: skip
                rows.append(row)
    multiples = [r["multiple"] for r in next(iter(report.values()))["dot/all"]["boundary_steering"]["rows"]]
    multiples = list(dict.fromkeys(multiples))
    head = ["category", "reading", "latent role", "latent", "subset", "n", "x1 α/|x|"]
    for m in multiples:
        head += [f"x{m:g} refusal [ctrl]", f"x{m:g} ΔR [ctrl]"]
    table("Steering on val+test borderline prompts (added at prompt positions, × mean firing activation)", head, rows)
    print("\nbaseline refusal of the steering prompts: " + ", ".join(
        f"{c.removeprefix('borderline:')} {r['baseline_refusal_rate']:.2f} (n={r['n_steer_prompts']})"
        for c, r in report.items()))  # fmt: skip


def mediation_report(
    model: Any, tokenizer: Any, fmt: ChatFormatter, direction: Direction, pool: list[Prompt], vocabularies: dict
) -> dict[str, Any]:
    """Is the harm word causal for borderline refusal, and where does its effect pass? (module doc)"""
    items = [(p.instruction, harm_words(p.instruction, vocabularies[p.category.removeprefix("borderline:")]))
             for p in pool if p.category]  # fmt: skip
    items = [x for x in items if x[1]]
    out = word_mediation(model, fmt, items, direction.vector, direction.layer, min_effect=1.0)
    swapped = [(t, s) for t, w in items if (s := swap_words(fmt, t, w)) is not None]
    before = refusals(model, tokenizer, fmt, [t for t, _ in swapped])
    refused = [s for (_, s), b in zip(swapped, before) if b]
    after = refusals(model, tokenizer, fmt, refused) if refused else []
    out["refusal"] = {"n_swappable": len(swapped), "n_refused": len(refused),
                      "still_refused_after_swap": sum(after) / len(after) if after else float("nan")}  # fmt: skip
    return out


def print_mediation(med: dict[str, Any]) -> None:
    ref = med["refusal"]
    print(
        f"\nswapping the harm word for a neutral word: {ref['n_refused']} of {ref['n_swappable']} borderline prompts "
        f"are refused; {ref['still_refused_after_swap']:.0%} of those are still refused after the swap"
    )
    table(
        f"Where the harm word's effect on R passes ({med['n_prompts']} prompts, R {med['mean_R']:.2f} -> "
        f"{med['mean_R_swapped']:.2f} after the swap): share recovered by patching only these positions",
        ["resid_pre layer", "harm-word tokens", "other instruction", "template"],
        [[x["layer"], *(x["shares"][g] for g in ("word", "instruction", "template"))] for x in med["layers"]],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-scenario", type=int, default=4, help="phrasings per borderline scenario (default 4)")
    ap.add_argument("--controls", type=int, default=3, help="random control latents per setting (default 3)")
    ap.add_argument("--multiples", type=float, nargs="+", default=[1.0, 2.0, 4.0, 16.0])
    ap.add_argument("--categories", nargs="+", help="harm categories (default: all)")
    ap.add_argument("--json", type=Path, help="also write the full report here")
    ap.add_argument("--sae", type=Path, help="upstream SAE folder (default: the organism's, chat data, layer 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tokenizer = load_model(None)
    fmt = ChatFormatter(tokenizer)
    direction = Direction.load(shipped_direction(), model=model)
    sae = load_sae(args.sae or shipped_saes()["upstream"], d_model=direction.vector.shape[0])
    vocabularies = category_vocabularies(split_prompts("harmful", ("train",)), split_prompts("harmless", ("train",)))
    tables = tuple(
        marking_table(model, fmt, sae, [p.instruction for p in split_prompts(kind, ("val", "test"))], vocabularies[""])
        for kind in ("harmful", "harmless")
    )
    steer_pool = split_prompts("borderline", ("val", "test"))
    report: dict[str, Any] = {}
    for i, (category, texts) in enumerate(scenario_prompts(args.per_scenario).items()):
        harm = category.removeprefix("borderline:")
        if args.categories and harm not in args.categories:
            continue
        vocab = vocabularies[harm]
        grads = category_gradients(model, fmt, texts, direction, sae)  # shared by every reading
        items = [prompt_attribution(fmt, sae, t, rg, vocab) for t, rg in zip(texts, grads)]
        steer = [p.instruction for p in steer_pool if p.category == category]
        report[category] = category_report(model, tokenizer, fmt, sae, direction, items, grads, steer, tables, args, i)
        print(f"{category}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print_tables(report)
    mediation = mediation_report(model, tokenizer, fmt, direction, steer_pool, vocabularies)
    print_mediation(mediation)
    if args.json:
        args.json.write_text(json.dumps({"categories": report, "word_mediation": mediation}, indent=1, default=float))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
