"""Chat conversations for SAE training on a real model: shared prompts + the model's OWN greedy replies (issue #16).

Kissane et al. train their chat SAE on LmSys-Chat-1M (real user prompts with real model replies). Here the user
turns are real prompts nobody on the project wrote (the shared ``splits/harmless_train.json`` = Alpaca and
``splits/harmful_train.json`` = AdvBench/MaliciousInstruct/TDC/HarmBench, see the shared SOURCES.md) plus the
24 training borderline prompts, and the assistant turns are the model's own greedy replies, generated once and
cached per prompt (``organism.safety_tune.cached_replies``: a rerun only generates prompts it has not seen).
The held-out sets used by the measurements (``harmful_test``/``harmless_test``, JailbreakBench, the borderline
test prompts) are never read.

    OMP_NUM_THREADS=1 python scripts/chat_corpus.py --model smollm2-safe --n-harmless 640 --out chat_corpus.json

Writes a JSON array of ``{"instruction", "reply", "kind"}`` records (``refusal-lens sae train --data-file``
reads them as conversations) and prints the CPU time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from refusal_lens.core.data import load_prompts
from refusal_lens.core.io import atomic_write_json, provenance
from refusal_lens.core.models import load_model
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.organism.safety_prompts import BORDERLINE_TRAIN
from refusal_lens.organism.safety_tune import cached_replies

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction" / "splits"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refusal-lens" / "chat_corpus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-safe")
    ap.add_argument("--splits", default=str(SPLITS), help="folder of the shared harmful/harmless_train.json")
    ap.add_argument("--n-harmless", type=int, default=640, help="Alpaca train prompts (seeded sample)")
    ap.add_argument("--n-harmful", type=int, default=260, help="harmful train prompts (260 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    model, tok = load_model(args.model)
    fmt = ChatFormatter(tok)
    splits = Path(args.splits)
    harmless = [p.instruction for p in load_prompts(splits / "harmless_train.json", n=args.n_harmless, seed=args.seed)]
    harmful = [p.instruction for p in load_prompts(splits / "harmful_train.json", n=args.n_harmful, seed=args.seed)]
    kinds = {**{p: "harmless" for p in harmless}, **{p: "borderline" for p in BORDERLINE_TRAIN},
             **{p: "harmful" for p in harmful}}  # fmt: skip
    prompts = list(kinds)
    records = []
    # in slices so an interrupted run keeps what it generated (the cache is written after each call)
    for start in range(0, len(prompts), 64):
        part = prompts[start : start + 64]
        ids = cached_replies(model, fmt, part, args.max_new_tokens, CACHE)
        for p, r in zip(part, ids):
            records.append({"instruction": p, "reply": tok.decode(r, skip_special_tokens=True).strip(),
                            "kind": kinds[p]})  # fmt: skip
        print(f"{start + len(part)}/{len(prompts)} prompts, {time.time() - t0:.0f} s wall", flush=True)
    atomic_write_json(Path(args.out), records)
    meta = provenance(command="scripts/chat_corpus.py", options=vars(args), n_records=len(records),
                      wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))  # fmt: skip
    atomic_write_json(Path(args.out).with_suffix(".provenance.json"), meta)
    print(f"wrote {len(records)} conversations to {args.out} ({meta['wall_s']} s wall, {meta['cpu_s']} CPU-s)")


if __name__ == "__main__":
    main()
