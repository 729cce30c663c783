"""``refusal-lens organism train``: rebuild the built-in model organism from its seed."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..core.config_args import HelpFormatter, add_dataclass_arguments, dataclass_from_args, number
from ..core.errors import UserError
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

    inputs = check_out(args)
    info = train_organism(
        args.out, seed=args.seed, steps=args.steps, quiet=args.quiet, overwrite=args.overwrite, inputs=inputs
    )
    print(json.dumps(info.get("behaviour", info), indent=2)[:2000])
    print(f"saved the organism to {args.out}; use it with --model {args.out}")
    return 0
