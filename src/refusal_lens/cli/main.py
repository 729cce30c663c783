"""The ``refusal-lens`` command.

Every subcommand lives in a small module that exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors caused by the user's input (:class:`~refusal_lens.core.errors.UserError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
import warnings
from collections.abc import Sequence

from ..core.config_args import HelpFormatter
from ..core.errors import UserError

# name -> (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("refusal_lens.cli.demo", "run the whole pipeline on the built-in model organism"),
    "direction": ("refusal_lens.cli.direction", "extract and select the refusal direction of a model"),
    "orthogonalize": ("refusal_lens.cli.orthogonalize", "remove a direction from a model's weights"),
    "evaluate": (
        "refusal_lens.cli.evaluate",
        "refusal, false refusal, KL and loss under an intervention",
    ),
    "report": ("refusal_lens.cli.report", "rebuild the HTML report of a results folder"),
    "organism": ("refusal_lens.cli.organism", "train the built-in model organism (organism train)"),
    "sae": ("refusal_lens.cli.sae", "train, evaluate and decompose with sparse autoencoders"),
    "upstream": ("refusal_lens.cli.upstream", "find SAE features upstream of refusal for a prompt"),
    "abliterate": (
        "refusal_lens.cli.abliterate",
        "search the refusal-vs-KL front of per-layer ablations, save a model",
    ),
    "capability": ("refusal_lens.cli.capability", "lm-eval tasks and plain-text CE loss of a model, beside a baseline"),
}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (naming the option) instead of the usage block and the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so ``refusal-lens --help`` imports no torch).

    With ``command=None`` every subcommand is listed with its one-line help but has no options of its own;
    ``"all"`` imports every command module (tests use it to check every option).
    """
    from .. import __version__

    parser = _Parser(
        prog="refusal-lens",
        description="Study how chat language models refuse: refusal directions (Arditi et al. 2024), SAEs on "
        "chat vs pretraining data (Kissane et al. 2024) and features upstream of refusal (Lee et al. 2025). "
        "With no --model, every command uses the built-in model organism. 'refusal-lens COMMAND --help' "
        "explains a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"refusal-lens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if command in (name, "all"):
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
            _add_quiet(p)
    return parser


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    """Every leaf command takes ``-q/--quiet`` (no progress bars), unless it defines its own."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        for child in set(action.choices.values()):
            _add_quiet(child)
    if not subcommands and "--quiet" not in parser._option_string_actions:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the global options --help/--version take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"refusal-lens: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # no file:line and source echo for the user's warnings
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    if os.environ.get("REFUSAL_LENS_PARSE_ONLY") == "1":  # docs tests: check a command's options, run nothing
        return 0
    from ..core.progress import set_quiet

    set_quiet(bool(getattr(args, "quiet", False)))
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"refusal-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refusal-lens {args.command}: interrupted; --out was left as it was.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
