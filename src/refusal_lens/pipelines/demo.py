"""The demo: the whole pipeline on the built-in model organism, in a few CPU minutes.

1. extract and select the refusal direction from the organism's training/validation splits;
2. evaluate baseline, directional ablation, activation addition, orthogonalized weights, and a random
   direction of the same norm as a control, on the organism's held-out harmful / harmless / borderline
   test splits (generation, judges, KL, CE loss);
3. write ``results.json``, ``completions.jsonl``, the direction, and an HTML report with figures.

Example:
    >>> summary = run_demo("demo-out")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.data import Prompt
from ..core.errors import UserError
from ..core.io import atomic_write_json, check_out_dir, staging_dir
from ..core.models import load_model
from ..direction.compute import DirectionConfig, compute_direction
from ..direction.interventions import ablate_direction, add_direction
from ..evaluation.conditions import EvalSettings, evaluate_conditions, save_evaluation, standard_conditions
from ..report import build_report

# The organism's addition adds r at the prompt's positions only. Adding it at every position, generated
# tokens included (the paper's setting), makes this tiny model repeat "I'mI'mI'm…" (SPEC §6); the demo
# reports that setting too, as "addition_all_positions", so the difference stays visible.
ADDITION_POSITIONS = "prompt"


def _split_of(kind: str, split: str, seed: int = 0) -> list[Prompt]:
    from ..organism import load_split

    return [Prompt(r["instruction"], r["category"]) for r in load_split(kind, split, seed)]


def run_demo(
    out: str | os.PathLike,
    model_path: str | None = None,
    n_prompts: int | None = 200,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Run the demo into ``out``; returns a short summary (also printed by the CLI).

    A non-empty ``out`` is replaced only with ``overwrite``; ``out`` may not overlap ``inputs``.
    """
    check_out_dir(out, overwrite, inputs)
    start = time.perf_counter()
    from ..organism import chat_pairs, corpus_seed, plain_text

    model, tokenizer = load_model(model_path)
    # An organism trained with another seed is evaluated on its own corpus (its held-out phrasings).
    cseed = corpus_seed(model_path) if model_path else 0
    _split = lambda kind, split: _split_of(kind, split, cseed)  # noqa: E731
    text = lambda prompts: [p.instruction for p in prompts]  # noqa: E731
    found = compute_direction(
        model,
        tokenizer,
        text(_split("harmful", "train")),
        text(_split("harmless", "train")),
        text(_split("harmful", "val")),
        text(_split("harmless", "val")),
        config=DirectionConfig(seed=seed, fallback_drop_induce=True),
        data_info={
            "harmful": "organism:harmful:train",
            "harmless": "organism:harmless:train",
            "harmful_val": "organism:harmful:val",
            "harmless_val": "organism:harmless:val",
        },
        progress=progress,
    )
    direction = found.chosen
    if direction is None:
        raise UserError(f"direction selection failed on the organism:\n{found.selection.explanation}")
    t_direction = time.perf_counter() - start

    conditions, descriptions = standard_conditions(model, direction, positions=ADDITION_POSITIONS)
    # Control: a random direction with the same norm must not bypass or induce refusal.
    gen = torch.Generator().manual_seed(seed + 1)
    random_dir = torch.randn(direction.vector.shape, generator=gen)
    random_dir = random_dir / random_dir.norm() * direction.vector.norm()
    conditions["addition_all_positions"] = lambda: add_direction(model, direction.vector, direction.layer, 1.0, "all")
    descriptions["addition_all_positions"] = {
        "intervention": "add", "layer": direction.layer, "coeff": 1.0, "positions": "all",
    }  # fmt: skip
    conditions["random_ablation"] = lambda: ablate_direction(model, random_dir)
    conditions["random_addition"] = lambda: add_direction(model, random_dir, direction.layer, 1.0, ADDITION_POSITIONS)
    descriptions["random_ablation"] = {"intervention": "ablate", "direction": "random, same norm (control)"}
    descriptions["random_addition"] = {
        "intervention": "add",
        "layer": direction.layer,
        "direction": "random, same norm (control)",
        "positions": ADDITION_POSITIONS,
    }

    pairs = [(c["instruction"], c["reply"]) for c in chat_pairs("test", cseed) if c.get("kind") == "harmless"]
    settings = EvalSettings(max_new_tokens=max_new_tokens, n_prompts=n_prompts, seed=seed, batch_size=64)
    sets = {
        "harmful": _split("harmful", "test"),
        "harmless": _split("harmless", "test"),
        "borderline": _split("borderline", "test"),
    }
    results, completions = evaluate_conditions(
        model,
        tokenizer,
        conditions,
        sets,
        settings,
        refusal_tokens=direction.meta.get("refusal_token_ids"),
        plain_text=plain_text(cseed)[:256],
        instruction_pairs=pairs,
        direction=direction,
        descriptions=descriptions,
        progress=progress,
        return_completions=True,
    )
    results["sae_lens"] = _sae_lens(model, tokenizer, direction, sets, settings, progress, model_path, cseed)
    ablated = results["conditions"].get("ablation", {}).get("harmful", {}).get("refusal_rate")
    for item in results["sae_lens"].get("latent_ablation", []):
        item["direction_ablation"] = ablated
    results["selection"] = {
        "explanation": found.selection.explanation if found.selection else "manual",
        "selected_by": direction.meta.get("selected_by"),
        "kept": sum(s.kept for s in found.selection.scores) if found.selection else None,
        "n_candidates": len(found.selection.scores) if found.selection else None,
    }
    with tempfile.TemporaryDirectory() as tmp, staging_dir(out, overwrite, inputs) as stage:
        direction.save(tmp)
        if found.selection is not None:
            atomic_write_json(Path(tmp) / "selection.json", found.selection.to_json())
        # save_evaluation builds `stage` afresh (copying selection/direction JSON for the report) ...
        save_evaluation(stage, results, completions, {"command": "demo"}, direction_dir=tmp, finalize=build_report)
        shutil.copytree(tmp, stage / "direction")  # ... then the direction joins it; all renamed at once
    summary = summarize(results)
    summary["seconds"] = {"direction": round(t_direction, 1), "total": round(time.perf_counter() - start, 1)}
    return summary


def _sae_lens(
    model: Any,
    tokenizer: Any,
    direction: Any,
    sets: dict,
    settings: EvalSettings,
    progress: bool,
    model_path: Any,
    cseed: int,
) -> Any:
    """The SAE-lens analyses with the organism's SAEs (skipped, with the reason, if they are absent)."""
    from ..lens.pipeline import run_sae_lens
    from ..organism import shipped_saes

    try:
        saes = shipped_saes(model_path)
    except UserError as exc:
        return {"skipped": str(exc)}
    ids = direction.meta.get("refusal_token_ids")

    def rates(conditions: dict, prompts: list | None = None) -> dict[str, float]:
        quick = EvalSettings(max_new_tokens=settings.max_new_tokens, n_prompts=settings.n_prompts, seed=settings.seed,
                             batch_size=settings.batch_size, kl=False, ce=False)  # fmt: skip
        res = evaluate_conditions(model, tokenizer, conditions, {"harmful": prompts or sets["harmful"]}, quick,
                                  refusal_tokens=ids, progress=progress)  # fmt: skip
        return {c: res["conditions"][c]["harmful"]["refusal_rate"] for c in conditions}

    at_direction = {k: v for k, v in saes.items() if k != "upstream"}
    # The harm vocabulary (words of harmful prompts never in harmless ones) comes from the training splits:
    # the test splits alone are too small and let words like "like" pass as harm words.
    vocabulary = (_split_of("harmful", "train", cseed), _split_of("harmless", "train", cseed))
    return run_sae_lens(model, tokenizer, direction, at_direction, sets["harmful"], sets["harmless"],
                        sets["borderline"], upstream_sae=saes["upstream"], evaluate_harmful=rates,
                        vocabulary_prompts=vocabulary)  # fmt: skip


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Refusal rates per condition and set, KL on harmless prompts, in a compact dict."""
    rows = {}
    for cond, entry in results["conditions"].items():
        rows[cond] = {
            name: entry[name]["refusal_rate"] for name in ("harmful", "harmless", "borderline") if name in entry
        }
        if entry.get("kl_harmless_answered") is not None:
            rows[cond]["kl_harmless"] = entry["kl_harmless_answered"]
    lens = results.get("sae_lens") or {}
    saes = {d["name"]: {k: d[k] for k in ("cosine", "relative_error", "max_single_latent_cosine")}
            for d in lens.get("decomposition", [])}  # fmt: skip
    return {
        "direction": results["direction"] | {"selected_by": (results.get("selection") or {}).get("selected_by")},
        "rates": rows, "saes": saes, "sae_lens_skipped": lens.get("skipped"),
    }  # fmt: skip


def format_summary(summary: dict[str, Any]) -> str:
    d = summary["direction"]
    how = f", {d['selected_by']}" if d.get("selected_by") and d["selected_by"] != "selection" else ""
    lines = [f"refusal direction: layer {d['layer']}, position {d['position']} (norm {d['norm']:.2f}{how})", ""]
    lines.append(f"{'condition':<24}{'harmful':>9}{'harmless':>10}{'borderline':>12}{'KL(answered)':>14}")
    for cond, row in summary["rates"].items():
        kl = row.get("kl_harmless")
        cells = [f"{row.get(k, float('nan')):>9.1%}" if k in row else f"{'-':>9}" for k in ("harmful",)]
        cells.append(f"{row['harmless']:>10.1%}" if "harmless" in row else f"{'-':>10}")
        cells.append(f"{row['borderline']:>12.1%}" if "borderline" in row else f"{'-':>12}")
        cells.append(f"{kl:>14.4f}" if isinstance(kl, float) else f"{'-':>14}")
        lines.append(f"{cond:<24}" + "".join(cells))
    if summary.get("saes"):
        lines += ["", f"{'SAE':<24}{'cos(r_SAE, r)':>14}{'rel. error':>12}{'best latent cos':>17}"]
        for name, d in summary["saes"].items():
            lines.append(
                f"{name:<24}{d['cosine']:>14.3f}{d['relative_error']:>12.3f}{d['max_single_latent_cosine']:>17.3f}"
            )
    elif summary.get("sae_lens_skipped"):
        lines += ["", f"(SAE lens skipped: {summary['sae_lens_skipped']})"]
    return "\n".join(lines)
