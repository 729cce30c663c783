"""`refusal-lens direction` on a real model, run as users run it (the console script, a subprocess), with the
paper's sizes (128 training and 32 validation prompts each, the shared splits): wall time and CPU time, with one
thread against more (``--threads``), or against the default thread choice.

    python benchmarks/bench_direction_cli.py [--model smollm2-safe] [--threads 1 default] [--repeats 1] \
        [--extra=--fallback-drop-induce]

The issue's target (#15): ``direction`` on SmolLM2 with the paper's sizes finishes in at most 3 min on 2 cores.
Each run's wall and CPU seconds (children's user+sys), the load average before it and the selection's outcome are
printed as JSON lines; the last line gives the wall-time ratio of the first thread setting to each other one.
Runs alternate between settings, so a drift in the machine's load hits all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction" / "splits"


def run_once(model: str, threads: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-direction-") as tmp:
        cmd = [
            "refusal-lens", "direction", "--model", model, "--quiet", "--out", str(Path(tmp) / "dir"),
            "--harmful", str(SPLITS / "harmful_train.json"), "--harmless", str(SPLITS / "harmless_train.json"),
            "--harmful-val", str(SPLITS / "harmful_val.json"), "--harmless-val", str(SPLITS / "harmless_val.json"),
            *([] if threads == "default" else ["--threads", threads]), *extra,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        load = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        outcome = (done.stdout + done.stderr).strip().splitlines()
        return {
            "threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "exit": done.returncode,
            "load_avg_before": [round(x, 2) for x in load], "outcome": outcome[:1] + outcome[-2:],
        }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-safe")
    p.add_argument("--threads", nargs="+", default=["1", "default"], help="settings to compare ('default': none)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--extra", default="", help="more direction options, one string: --extra=--fallback-drop-induce")
    args = p.parse_args()
    if not SPLITS.is_dir():
        print(f"needs the shared prompt files at {SPLITS}", file=sys.stderr)
        return 2
    walls: dict[str, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.repeats):
        for t in args.threads:
            r = run_once(args.model, t, shlex.split(args.extra))
            walls[t].append(r["wall_s"])
            print(json.dumps(r), flush=True)
    first = statistics.median(walls[args.threads[0]])
    ratios = {t: round(first / statistics.median(w), 2) for t, w in walls.items()}
    print(json.dumps({"model": args.model, "median_wall_s": {t: statistics.median(w) for t, w in walls.items()},
                      "ratio_vs_" + args.threads[0]: ratios, "target_wall_s": 180}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
