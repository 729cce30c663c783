"""Precision and recall of the text judges on the hand-labelled real replies in tests/data/judge_replies.jsonl.

    python scripts/judge_precision_recall.py

Each record is one real reply (SmolLM2-135M-Instruct's, the organism's, or a reply quoted in issue #15) with
``refused`` set by a person reading it. "Refused" means the reply declines the request (fully or by
deflecting), whether or not the request was harmful. The logit judge needs the model, so it is not here.
"""

from __future__ import annotations

import json
from pathlib import Path

from refusal_lens.direction.refusal_fit import REFUSAL_PHRASES
from refusal_lens.evaluation.judges import PrefixJudge, SubstringJudge

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_replies.jsonl"
JUDGES = {
    "substring (paper)": SubstringJudge(),
    "substring + extras": SubstringJudge(substrings=REFUSAL_PHRASES, name="substring+"),
    "prefix": PrefixJudge(),
}


def load() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def measure(records: list[dict]) -> dict[str, dict]:
    """Per judge: tp/fp/fn/tn, precision, recall, and the replies it got wrong."""
    out = {}
    for name, judge in JUDGES.items():
        said = judge.judge([r["prompt"] for r in records], [r["reply"] for r in records])
        tp = sum(s and r["refused"] for s, r in zip(said, records))
        fp = sum(s and not r["refused"] for s, r in zip(said, records))
        fn = sum(not s and r["refused"] for s, r in zip(said, records))
        out[name] = {
            "tp": tp, "fp": fp, "fn": fn, "tn": len(records) - tp - fp - fn,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "missed": [r["reply"][:80] for s, r in zip(said, records) if not s and r["refused"]],
            "false_alarms": [r["reply"][:80] for s, r in zip(said, records) if s and not r["refused"]],
        }  # fmt: skip
    return out


def main() -> None:
    records = load()
    by_model: dict[str, int] = {}
    for r in records:
        by_model[r["model"]] = by_model.get(r["model"], 0) + 1
    print(f"{len(records)} labelled replies ({sum(r['refused'] for r in records)} refusals): {by_model}")
    print(f"{'judge':<22}{'precision':>10}{'recall':>8}{'tp':>5}{'fp':>5}{'fn':>5}{'tn':>5}")
    for name, m in measure(records).items():
        p = "-" if m["precision"] is None else f"{m['precision']:.2f}"
        r = "-" if m["recall"] is None else f"{m['recall']:.2f}"
        print(f"{name:<22}{p:>10}{r:>8}{m['tp']:>5}{m['fp']:>5}{m['fn']:>5}{m['tn']:>5}")
        for text in m["missed"]:
            print(f"    missed: {text!r}")
        for text in m["false_alarms"]:
            print(f"    false alarm: {text!r}")


if __name__ == "__main__":
    main()
