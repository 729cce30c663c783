"""Dataclass configs as command-line options: each field's docstring is its ``--help`` text.

Example:
    >>> add_dataclass_arguments(parser, SelectionConfig)        # doctest: +SKIP
    >>> cfg = dataclass_from_args(SelectionConfig, args)       # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from functools import cache
from typing import Any


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
            target.add_argument(flag, dest=dest, type=typ, default=default, help=help_text, metavar=metavar)


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
    return cls(**values)
