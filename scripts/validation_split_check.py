"""Carved vs standard validation prompts: does the selection choose the same candidate, and how sure is it?

    OMP_NUM_THREADS=1 python scripts/validation_split_check.py                 # the organism, its splits
    OMP_NUM_THREADS=1 python scripts/validation_split_check.py --model DIR --harmful F --harmless F \\
        --harmful-val F --harmless-val F [--system S] [--no-prune] [--n-val N]

Runs ``compute_direction`` twice on the same training file: once with the validation set carved out of it
(``--harmful-val`` not given) and once with the standard validation files, and prints each run's choice, the
share of bootstrap resamples that choose it, the other's choice's share, and the chosen candidate's intervals.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refusal_lens.core.models import load_model
from refusal_lens.direction.compute import DirectionConfig, compute_direction
from refusal_lens.direction.selection import SelectionConfig
from refusal_lens.organism import load_prompts


def _texts(spec: str) -> list[str]:
    return [p.instruction for p in load_prompts(spec)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--harmful", default="organism:harmful:train")
    ap.add_argument("--harmless", default="organism:harmless:train")
    ap.add_argument("--harmful-val", default="organism:harmful:val")
    ap.add_argument("--harmless-val", default="organism:harmless:val")
    ap.add_argument("--system", default=None)
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--n-val", type=int, default=None, help="validation prompts per set (default: the tool's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    harmful, harmless = _texts(args.harmful), _texts(args.harmless)
    cfg = DirectionConfig(n_val=args.n_val, selection=SelectionConfig(prune=not args.no_prune))
    runs = {}
    for name, val in (("carved", (None, None)), ("standard", (_texts(args.harmful_val), _texts(args.harmless_val)))):
        t0 = time.perf_counter()
        res = compute_direction(model, tok, harmful, harmless, *val, config=cfg, system=args.system, progress=False)
        sel = res.selection
        boot = sel.bootstrap
        chosen = None if sel.chosen is None else f"pos {sel.chosen.position} layer {sel.chosen.layer}"
        runs[name] = {
            "n_val": res.info["config"]["n_val"], "val_counts": res.info["counts_sampled"],
            "chosen": chosen, "passed": sum(s.kept for s in sel.scores), "seconds": round(time.perf_counter() - t0, 1),
            "chosen_frequency": boot["chosen_frequency"], "choice_frequency": boot["choice_frequency"],
            "none_passed_fraction": boot["none_passed_fraction"], "intervals": boot["intervals"].get(chosen),
            "summary": boot["summary"],
        }  # fmt: skip
    for name, r in runs.items():
        other = runs["standard" if name == "carved" else "carved"]["chosen"]
        share = r["choice_frequency"].get(other, 0.0) if other else r["none_passed_fraction"]
        print(f"{name} (n_val {r['n_val']}; sampled {r['val_counts']}): chose {r['chosen']} "
              f"({r['passed']} passed, {r['seconds']} s); the other run's "
              f"choice ({other}) wins {100 * share:.0f}% of this run's resamples")  # fmt: skip
        print(f"  {r['summary']}")
    same = runs["carved"]["chosen"] == runs["standard"]["chosen"]
    print(f"same candidate chosen: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=2)


if __name__ == "__main__":
    main()
