"""Dataclass configs as command-line options: each field's docstring is its ``--help`` text.

Numeric fields carry their allowed range in ``metadata`` (:func:`at_least`, :func:`positive`,
:func:`fraction`...); the same range checks the option at parse time (:func:`number`) and the built config
(:func:`validate`). Every float must be finite.

Example:
    >>> add_dataclass_arguments(parser, SelectionConfig)        # doctest: +SKIP
    >>> cfg = dataclass_from_args(SelectionConfig, args)       # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import textwrap
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

from .errors import UserError

RANGE_KEY = "range"


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, **meta: Any) -> dict[str, Any]:
    """Field metadata: the value must lie in [lo, hi] (``lo_open``: strictly above ``lo``)."""
    return {**meta, RANGE_KEY: (lo, hi, lo_open)}


def at_least(lo: float, **meta: Any) -> dict[str, Any]:
    return in_range(lo, None, **meta)


def positive(**meta: Any) -> dict[str, Any]:
    return in_range(0, None, lo_open=True, **meta)


def fraction(**meta: Any) -> dict[str, Any]:
    """A probability or share: in [0, 1]."""
    return in_range(0, 1, **meta)


def describe_range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}" + (f" (above {lo})" if lo_open else "")
    if lo is not None:
        return f"above {lo}" if lo_open else f"at least {lo}"
    return f"at most {hi}" if hi is not None else "a finite number"


def range_problem(value: Any, lo: float | None, hi: float | None, lo_open: bool = False) -> str | None:
    """Why ``value`` is out of range (None if it is fine). Non-finite floats are always refused."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        return "must be " + describe_range(lo, hi, lo_open)
    return None


def number(
    kind: type = float, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and checks its range (floats: finite too)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = range_problem(value, lo, hi, lo_open)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem} (got {text})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def field_type(f: dataclasses.Field, kind: type) -> Callable[[str], Any] | type:
    """The argparse ``type=`` of a dataclass field: range-checked numbers, anything else as is."""
    if kind in (int, float):
        return number(kind, *f.metadata.get(RANGE_KEY, (None, None, False)))
    return kind


def validate(config: Any) -> Any:
    """Raise :class:`UserError` if a field of the dataclass ``config`` is out of its range; returns ``config``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
            continue
        problem = range_problem(value, *f.metadata.get(RANGE_KEY, (None, None, False)))
        if problem:
            flag = "--" + f.name.replace("_", "-")
            raise UserError(f"{flag} {value} {problem}; fix the option ({type(config).__name__}.{f.name}).")
    return config


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (its attribute docstring)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = plain_help(nxt.value.value)
    return docs


# reStructuredText roles and literals in docstrings (``x``, :func:`x`, :class:`~a.b.X`) read as plain words in --help
_RST_ROLE = re.compile(r":\w+:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain_help(text: str) -> str:
    """A docstring as one line of ``--help`` text: whitespace collapsed, reST markup dropped."""
    text = _RST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(_RST_LITERAL.sub(r"\1", text).split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when the help text already names it, and never ``None``/``False``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _base_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] | set[str] = (),
    title: str | None = None,
    rename: dict[str, str] | None = None,
) -> None:
    """Add ``--field-name`` options for every (non-dataclass) field of ``cls``, in a group ``title`` if given.

    Defaults are shown by :class:`HelpFormatter`, not repeated in the help text. ``rename`` maps a field to
    another destination (and flag) where two configs of one command share a field name; a field's
    ``metadata["flag"]`` renames only its option (e.g. ``system_prompt`` is ``--system`` in every command).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rename = rename or {}
    target = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        typ = _base_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        dest = rename.get(f.name, f.name)
        flag = "--" + (rename.get(f.name) or f.metadata.get("flag", f.name)).replace("_", "-")
        help_text = (docs.get(f.name) or plain_help(f.metadata.get("help", ""))).replace("%", "%%")
        if typ is bool:
            target.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            metavar = flag[2:].upper().replace("-", "_")
            kind = field_type(f, typ)  # range-checked numbers
            target.add_argument(flag, dest=dest, type=kind, default=default, help=help_text, metavar=metavar)


def dataclass_from_args(
    cls: type, args: argparse.Namespace, rename: dict[str, str] | None = None, **overrides: Any
) -> Any:
    """Build ``cls`` from parsed options (fields missing from ``args`` keep their defaults)."""
    rename = rename or {}
    values = {}
    for f in dataclasses.fields(cls):
        dest = rename.get(f.name, f.name)
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    values.update(overrides)
    return validate(cls(**values))
