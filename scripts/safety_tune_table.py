"""Issue #16 table 1 from the folders written by scripts/safety_tune_eval.py (one row per folder).

    python scripts/safety_tune_table.py results/plain results/safe [...]

CE change is relative to the first folder's plain-text CE (run the plain model first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders: list[Path]) -> None:
    print("| model | JailbreakBench refused (substring / prefix) | Alpaca test refused | borderline refused |"
          " plain-text CE (change) | eval wall / CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    base_ce = None
    for folder in folders:
        s = json.loads((folder / "summary.json").read_text())

        def cell(name: str, s: dict = s) -> str:
            e = s.get(name)
            if not e:
                return "not run"
            r = e["refusal_rate"]
            return f"{r['substring']:.0%} / {r['prefix']:.0%} (n={e['n']})"

        ce = s.get("plain_text_ce", {}).get("ce")
        base_ce = base_ce if base_ce is not None else ce
        change = f" ({ce / base_ce - 1:+.1%})" if ce and base_ce else ""
        name = s["model"]["model"].rsplit("/", 1)[-1] + (" + system prompt" if s.get("system") else "")
        print(f"| {name} | {cell('jailbreakbench')} | {cell('alpaca_test')} | {cell('borderline_test')} | "
              f"{ce:.4f}{change} | {s['time']['wall_s']:.0f} s / {s['time']['cpu_s']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
