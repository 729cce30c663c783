"""``refusal-lens report DIR``: rebuild ``report.html`` and ``figures/*.png`` from a saved evaluation folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder written by `refusal-lens evaluate` (holds results.json)")
    p.add_argument("--out", default=None, help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from ..report import build_report

    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError(f"results folder {folder} does not exist; pass the --out folder of `refusal-lens evaluate`.")
    if args.out is not None:
        from ..core.io import check_out_file

        check_out_file(args.out, args.overwrite, [folder / "results.json", folder / "completions.jsonl"])
    path = build_report(folder, args.out)
    print(f"wrote {path} and {folder / 'figures'}/*.png")
    return 0
