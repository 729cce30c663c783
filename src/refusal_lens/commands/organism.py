"""``refusal-lens organism train``: rebuild the built-in model organism from its seed."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="organism_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train an organism (about 5-10 CPU minutes) into --out",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--out", required=True, help="folder for the checkpoint (a normal HF model folder)")
    t.add_argument("--seed", type=int, default=0, help="seed for the corpus, initialisation and batches")
    t.add_argument("--steps", type=int, default=None, help="override the recipe's number of training steps")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..organism import train_organism

    info = train_organism(args.out, seed=args.seed, steps=args.steps, quiet=args.quiet)
    print(json.dumps(info.get("behaviour", info), indent=2)[:2000])
    print(f"saved the organism to {args.out}; use it with --model {args.out}")
    return 0
