"""Run every benchmark and print a table of ratios (ours vs a reference, timed side by side in one run).

    python benchmarks/run.py [--quick] [--json OUT] [--only NAME ...]

A ratio > 1 means ours is better (faster, or leaner for memory); each has a target from the issue tracker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_core, bench_ortho  # noqa: E402
from benchmarks.common import Result  # noqa: E402

BENCHMARKS = {
    "capture_overhead": bench_core.capture_overhead,
    "selection_speedup": bench_core.selection_speedup,
    "generation_overhead": bench_core.generation_overhead,
    "abliterate_shared_prefix": bench_core.abliterate_shared_prefix,
    "abliterate_gradient_shared_prefix": bench_core.abliterate_gradient_shared_prefix,
    "streaming_ortho_memory": bench_ortho.streaming_ortho_memory,
}
try:
    from benchmarks import bench_sae  # noqa: E402

    BENCHMARKS.update(bench_sae.BENCHMARKS)
except ImportError as exc:  # the SAE benchmarks need the SAE subsystem
    print(f"(SAE benchmarks unavailable: {exc})", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (< 5 min on 2 cores)")
    p.add_argument("--json", default=None, help="write {'benchmarks': [...]} here")
    p.add_argument("--only", nargs="*", default=None, help="run only these benchmarks")
    args = p.parse_args()
    import torch

    torch.manual_seed(0)
    results = []
    for name, fn in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        try:
            res = fn(args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc()
            res = Result(name, None, float("nan"), note=f"failed: {exc}")
        res.details["wall_s"] = round(time.perf_counter() - t, 1)
        results.append(res)
        print(_row(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmarks": [r.to_json() for r in results]}, indent=2) + "\n")
    return 0


def _row(r: Result) -> str:
    j = r.to_json()
    if r.ratio is None:
        return f"{r.name:<26} {'-':>7}  target {r.target:>5}  {r.note}"
    mark = "met" if r.met else "NOT met"
    return (f"{r.name:<26} {r.ratio:7.2f}x  target {r.target:>5}  {mark:<8} "
            f"min {j['min']:.2f} med {j['median']:.2f} max {j['max']:.2f}  {json.dumps(r.details)}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
