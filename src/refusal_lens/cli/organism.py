"""``refusal-lens organism train``: rebuild the built-in model organism from its seed.

``refusal-lens organism safety-tune``: the seeded LoRA safety-tune of SmolLM2 behind ``--model smollm2-safe``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..core.config_args import HelpFormatter, add_dataclass_arguments, dataclass_from_args, number
from ..core.errors import UserError
from ..organism.safety_tune import SafetyTuneConfig
from ..pipelines.organism_artifacts import ArtifactRecipe
from .common import add_overwrite_argument, check_out


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="organism_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train an organism (about 5-10 CPU minutes) into --out",
        formatter_class=HelpFormatter,
    )
    t.add_argument("--out", required=True, help="folder for the checkpoint (a normal HF model folder)")
    t.add_argument("--seed", type=int, default=0, help="seed for the corpus, initialisation and batches")
    t.add_argument("--steps", type=number(int, 1), default=None, help="override the recipe's number of training steps")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_argument(t)
    a = sub.add_parser(
        "artifacts",
        help="rebuild the organism's shipped direction and its two SAEs (chat data vs plain text)",
        formatter_class=HelpFormatter,
    )
    a.add_argument(
        "--checkpoint",
        required=True,
        help="organism folder (from `organism train --out`) whose direction/ and saes/ are rebuilt in place",
    )
    add_dataclass_arguments(a, ArtifactRecipe)
    s = sub.add_parser(
        "safety-tune",
        help="LoRA safety-tune of SmolLM2 (the adapter behind --model smollm2-safe; ~20 CPU minutes)",
        formatter_class=HelpFormatter,
    )
    s.add_argument("--out", required=True, help="folder for the adapter (PEFT format + provenance.json)")
    s.add_argument("--model", default="smollm2", help="the chat model to tune (a name, GGUF or HF folder)")
    s.add_argument("--harmful", required=True, help="harmful TRAIN prompts (e.g. shared splits/harmful_train.json)")
    s.add_argument("--harmless", required=True, help="harmless TRAIN prompts (e.g. splits/harmless_train.json)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--no-cache", action="store_true", help="regenerate the model's own replies (no reply cache)")
    s.add_argument(
        "--replies",
        default=None,
        help="the model's own replies to reuse as targets (e.g. the shipped adapter's own_replies.json)",
    )
    s.add_argument("--quiet", action="store_true", help="no per-step loss lines")
    add_dataclass_arguments(s, SafetyTuneConfig)


def run(args: argparse.Namespace) -> int:
    from ..organism import train_organism

    if args.organism_command == "artifacts":
        from ..organism import path
        from ..pipelines.organism_artifacts import build_artifacts

        recipe = dataclass_from_args(ArtifactRecipe, args)
        if Path(args.checkpoint).resolve() == Path(path()).resolve() and not os.access(path(), os.W_OK):
            raise UserError(f"--checkpoint {args.checkpoint} is the installed organism and not writable; copy it.")
        print(json.dumps(build_artifacts(args.checkpoint, recipe), indent=2))
        return 0

    if args.organism_command == "safety-tune":
        return _safety_tune(args)
    inputs = check_out(args)
    info = train_organism(
        args.out, seed=args.seed, steps=args.steps, quiet=args.quiet, overwrite=args.overwrite, inputs=inputs
    )
    print(json.dumps(info.get("behaviour", info), indent=2)[:2000])
    print(f"saved the organism to {args.out}; use it with --model {args.out}")
    return 0


def _safety_tune(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..core.gguf import cache_dir
    from ..core.models import load_model, model_name
    from ..organism.safety_tune import safety_tune, write_adapter

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} already exists; choose another folder or pass --force to replace it.")
    cfg = dataclass_from_args(SafetyTuneConfig, args)
    model, tokenizer = load_model(args.model)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    cache = None if args.no_cache else cache_dir() / "safety_tune"
    replies = Path(args.replies) if args.replies else None
    if replies is not None and not replies.is_file():
        raise UserError(f"--replies {replies} does not exist; pass an own_replies.json written by safety-tune.")
    adapter, info = safety_tune(
        model, tokenizer, args.harmful, args.harmless, cfg, cache=cache, log=log, replies_file=replies
    )
    write_adapter(adapter, info, out, model_name(model), overwrite=args.force)
    print(json.dumps({"adapter": str(out), "parameters": adapter.n_parameters(), "time": info["time"],
                      "final_loss": info["losses"][-5:]}, indent=2))  # fmt: skip
    print(f"saved the adapter to {out}; it is --model smollm2-safe when written to refusal_lens/organism/smollm2_safe")
    return 0
