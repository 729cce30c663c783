"""``refusal-lens demo``: the whole pipeline on the built-in model organism (about 4.5 CPU-minutes, one thread)."""

from __future__ import annotations

import argparse

from ..core.config_args import number
from ..pipelines.demo import format_summary, run_demo
from .common import add_overwrite_argument, check_out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output folder (results.json, report.html, direction/)")
    add_overwrite_argument(p)
    p.add_argument("--model", default=None, help="organism checkpoint folder (default: the shipped organism)")
    p.add_argument(
        "--n-prompts", type=number(int, 1), default=200, help="prompts evaluated per test set (seeded sample)"
    )
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128, help="tokens generated per reply")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling prompts")
    p.add_argument(
        "--threads",
        type=number(int, 1),
        default=1,
        help="torch threads; the organism is tiny, and one thread is fastest, above all beside other busy processes",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    inputs = check_out(args)
    torch.set_num_threads(args.threads)
    summary = run_demo(
        args.out,
        args.model,
        args.n_prompts,
        args.max_new_tokens,
        args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
        inputs=inputs,
    )
    print(format_summary(summary))
    print(
        f"\nwrote {args.out}/results.json, {args.out}/report.html and {args.out}/direction/ "
        f"in {summary['seconds']['total']:.0f} s"
    )
    return 0
