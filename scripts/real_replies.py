"""Generate greedy replies of a model to a spread of harmful and harmless prompts, for hand labelling.

The labelled set in tests/data/judge_replies.jsonl was made this way (then read and labelled by hand):

    OMP_NUM_THREADS=1 python scripts/real_replies.py --model smollm2 --n-harmful 24 --n-harmless 12 \\
        --max-new-tokens 48 --out /tmp/smollm2_replies.jsonl
    OMP_NUM_THREADS=1 python scripts/real_replies.py --n-harmful 8 --n-harmless 6 --out /tmp/organism_replies.jsonl

Harmful prompts: every k-th of JailbreakBench (all categories); harmless: every k-th of Alpaca, from the
shared ``processed/`` files (the organism uses its own test splits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from refusal_lens.core.models import input_device, load_model
from refusal_lens.core.prompts import ChatFormatter, read_chat_template
from refusal_lens.organism import load_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction" / "processed"


def spread(items: list, n: int) -> list:
    step = max(1, len(items) // n)
    return items[::step][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-harmful", type=int, default=24)
    ap.add_argument("--n-harmless", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--system", default=None)
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    template = read_chat_template(args.chat_template) if args.chat_template else None
    fmt = ChatFormatter(tok, system=args.system, chat_template=template)
    if args.model is None:
        sets = {
            "organism:harmful:test": [p.instruction for p in load_prompts("organism:harmful:test")],
            "organism:harmless:test": [p.instruction for p in load_prompts("organism:harmless:test")],
        }
    else:
        sets = {
            "jailbreakbench": [r["instruction"] for r in json.loads((SHARED / "jailbreakbench.json").read_text())],
            "alpaca": [r["instruction"] for r in json.loads((SHARED / "alpaca.json").read_text())],
        }
    (harmful_src, harmful), (harmless_src, harmless) = sets.items()
    rows = [(harmful_src, "harmful", p) for p in spread(harmful, args.n_harmful)]
    rows += [(harmless_src, "harmless", p) for p in spread(harmless, args.n_harmless)]
    t0 = time.perf_counter()
    out = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        batch = fmt.encode([p for _, _, p in chunk], input_device(model))
        with torch.no_grad():
            gen = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        for (src, kind, prompt), ids in zip(chunk, gen[:, batch["input_ids"].shape[1] :]):
            reply = tok.decode(ids, skip_special_tokens=True)
            out.append({"model": args.model or "organism", "source": src, "kind": kind, "prompt": prompt,
                        "system": args.system, "reply": reply})  # fmt: skip
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} replies in {time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
