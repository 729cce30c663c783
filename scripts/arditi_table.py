"""Issue #16 table 2 from the folders of scripts/arditi_table.sh: one row per model beside the paper's figures.

    python scripts/arditi_table.py results/arditi

Refusal rates use the substring judge (the paper's list; the prefix judge's rate follows in brackets). KL is the
mean first-token KL on the harmless set; CE is nats per token on the plain-text corpus. "orth = hooks" counts the
prompts whose orthogonalized-weights reply equals the ablation-hook reply, character for character.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = {"plain": "SmolLM2-135M-Instruct", "sys": "  + refusing system prompt", "safe": "smollm2-safe (LoRA)"}
PAPER = ("| Llama-3-8B-Instruct (paper, JailbreakBench n=100) | L12/32, pos −5 | 0.95 | 0.00 | ~0.01 → ~1.00 | "
         "identical (App. E) | — (organism here: no change) | ≤ 0.1 (filter) | Pile 2.348 → 2.362 |")  # fmt: skip


def rate(results: dict, cond: str, prompt_set: str) -> str:
    entry = results["conditions"].get(cond, {}).get(prompt_set)
    if not entry:
        return "—"
    judges = entry["judges"]
    return f"{judges['substring']['rate']:.2f} ({judges['prefix']['rate']:.2f})"


def same_tokens(folder: Path) -> str:
    path = folder / "completions.jsonl"
    if not path.is_file():
        return "—"
    by = {}
    for line in path.read_text().splitlines():
        c = json.loads(line)
        by.setdefault(c["intervention"], {})[(c["prompt_set"], c["prompt"])] = c["completion"]
    hooks, orth = by.get("ablation", {}), by.get("orthogonalized", {})
    keys = [k for k in hooks if k in orth]
    return f"{sum(hooks[k] == orth[k] for k in keys)}/{len(keys)}" if keys else "—"


def main(root: Path) -> None:
    print(
        "| model | layer, pos | harmful refused | after ablation | harmless refused after addition | orth = hooks |"
        " random dir: ablation / addition | KL (ablation) | CE plain text: base → ablation / orth. |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(PAPER)
    for name, label in ROWS.items():
        folder = root / name
        res_path = folder / "eval" / "results.json"
        if not res_path.is_file():
            log = folder / "direction.log"
            why = log.read_text().strip().splitlines()[-1][:160] if log.is_file() else "not run"
            print(f"| {label} | no direction: {why} | | | | | | | |")
            continue
        res = json.loads(res_path.read_text())
        rnd_path = folder / "random-eval" / "results.json"
        rnd = json.loads(rnd_path.read_text()) if rnd_path.is_file() else {"conditions": {}}
        d, c = res["direction"], res["conditions"]

        def ce(cond: str, conds: dict = c) -> str:
            v = (conds.get(cond, {}).get("ce_loss") or {}).get("plain_text")
            return f"{v:.3f}" if isinstance(v, float) else "—"

        n = res["prompt_sets"]["harmful"]["n"]
        print(f"| {label} (n={n}, {res['settings'].get('max_new_tokens')} tok) | L{d['layer']}, {d['position']} | "
              f"{rate(res, 'baseline', 'harmful')} | {rate(res, 'ablation', 'harmful')} | "
              f"{rate(res, 'baseline', 'harmless')} → {rate(res, 'addition', 'harmless')} | "
              f"{same_tokens(folder / 'eval')} | "
              f"{rate(rnd, 'ablation', 'harmful')} / {rate(rnd, 'addition', 'harmless')} | "
              f"{c.get('ablation', {}).get('kl_harmless', float('nan')):.3f} | "
              f"{ce('baseline')} → {ce('ablation')} / {ce('orthogonalized')} |")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/arditi"))
