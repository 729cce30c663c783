"""smollm2-safe's LoRA scale against refusal, on the VALIDATION splits only (never the test sets).

    python scripts/lora_scale_sweep.py 1.0 0.8 0.72 0.65 0.5 [--adapter DIR] [--n-harmless 64] [--tokens 32] [--out F]

For each scale ``s`` the adapter's delta ``s * alpha/r * B @ A`` is merged into SmolLM2-135M-Instruct and greedy
replies are generated for all of ``splits/harmful_val.json`` (39) and a seeded sample of ``splits/harmless_val.json``;
the substring and prefix judges give the refusal rates. Scale 1.0 is the shipped model. A scale that keeps harmful
refusal >= 90 % and false refusal <= 5 % here would be the one to confirm on the held-out test sets.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from refusal_lens.core.data import sample
from refusal_lens.core.lora import load_adapter, merge_adapter
from refusal_lens.core.models import load_model
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.core.real_models import adapter_dir
from refusal_lens.evaluation.generation import GenerationSettings, generate
from refusal_lens.evaluation.judges import PrefixJudge, SubstringJudge

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction" / "splits"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scales", nargs="+", type=float)
    p.add_argument("--adapter", default=None, help="adapter folder (default: the shipped smollm2-safe adapter)")
    p.add_argument("--n-harmless", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default="lora_scale_sweep.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    def read(name: str) -> list[str]:
        return [r["instruction"] for r in json.loads((SPLITS / name).read_text())]

    base, tok = load_model("smollm2", dtype="float32")
    adapter, _ = load_adapter(args.adapter or adapter_dir("smollm2-safe"))
    alpha = adapter.alpha
    fmt = ChatFormatter(tok)
    harmless = sample(read("harmless_val.json"), args.n_harmless, 0)
    sets = {"harmful_val": read("harmful_val.json"), "harmless_val": harmless}
    results: dict[str, dict] = {}
    for scale in args.scales:
        model = copy.deepcopy(base)
        adapter.alpha = alpha * scale
        merge_adapter(model, adapter)
        row: dict = {}
        for name, prompts in sets.items():
            settings = GenerationSettings(max_new_tokens=args.tokens)
            replies = [c.completion for c in generate(model, tok, prompts, settings=settings, formatter=fmt,
                                                      prompt_set=name, progress=False)]  # fmt: skip
            for judge in (SubstringJudge(), PrefixJudge()):
                verdicts = judge.judge(prompts, replies)
                row[f"{name}/{judge.name}"] = round(sum(verdicts) / len(verdicts), 4)
            wrong = [(q, r) for q, r, v in zip(prompts, replies, SubstringJudge().judge(prompts, replies))
                     if v != name.startswith("harmful")]  # fmt: skip
            row[f"{name}/misjudged_examples"] = wrong[:8]
        results[str(scale)] = row
        print(scale, {k: v for k, v in row.items() if not k.endswith("examples")}, flush=True)
    Path(args.out).write_text(json.dumps({"sizes": {k: len(v) for k, v in sets.items()}, "tokens": args.tokens,
                                          "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
