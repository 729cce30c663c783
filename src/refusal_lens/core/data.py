"""Prompt sets: local JSON / JSONL / CSV / Parquet files and ``datasets`` hub ids.

Every loader returns a list of :class:`Prompt` (instruction + optional category). The column holding the
instruction is found automatically for the standard refusal benchmarks (AdvBench ``goal``, HarmBench
``Behavior``, JailbreakBench ``Goal``, StrongREJECT ``forbidden_prompt``, Alpaca/refusal_direction
``instruction``) or given with ``column=``.

Example:
    >>> load_prompts("../shared/datasets/refusal_direction/processed/jailbreakbench.json")[:1]  # doctest: +SKIP
    [Prompt(instruction='Write a defamatory article ...', category='Harassment/Discrimination')]
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import UserError

INSTRUCTION_COLUMNS = (
    "instruction",
    "prompt",
    "goal",
    "Goal",
    "Behavior",
    "behavior",
    "forbidden_prompt",
    "text",
)
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory", "semantic_category")
ORGANISM_PREFIX = "organism:"
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None


def _from_records(records: list, source: str, column: str | None) -> list[Prompt]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(Prompt(rec))
            continue
        if not isinstance(rec, dict):
            raise UserError(f"{source}: record {i} is neither a string nor an object; use a list of strings/objects.")
        col = column or next((c for c in INSTRUCTION_COLUMNS if c in rec), None)
        if col is None or col not in rec:
            wanted = column or " / ".join(INSTRUCTION_COLUMNS)
            raise UserError(f"{source}: no column {wanted!r} (columns: {', '.join(rec)}); pass --column NAME.")
        cat = next((rec[c] for c in CATEGORY_COLUMNS if rec.get(c) is not None), None)
        out.append(Prompt(str(rec[col]), None if cat is None else str(cat)))
    return out


def load_prompts(
    source: str | os.PathLike,
    column: str | None = None,
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
) -> list[Prompt]:
    """Load prompts from a file or a hub dataset id.

    ``n`` draws a deterministic sample of that size (seeded); the order is otherwise kept. The organism's
    splits (``organism:KIND:SPLIT``) are read by :func:`refusal_lens.organism.load_prompts`, which also
    reads everything this function does.
    """
    text = str(source)
    if text.startswith(ORGANISM_PREFIX):
        raise UserError(f"{text}: organism splits are read by refusal_lens.organism.load_prompts.")
    path = Path(text).expanduser()
    if path.is_file():
        prompts = _load_file(path, column)
    elif text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        prompts = _load_hub(text, column, split)
    else:
        raise UserError(f"prompt file {text} does not exist; check the path.")
    return finish_prompts(prompts, text, n, seed)


def finish_prompts(prompts: list[Prompt], source: str, n: int | None = None, seed: int = 0) -> list[Prompt]:
    """Drop blank instructions, refuse an empty set (naming ``source``), and draw ``n`` of them if asked.

    Instructions longer than :data:`MAX_PROMPT_CHARS` are cut (with one warning), so tokenizing them stays cheap.
    """
    prompts = [p for p in prompts if p.instruction.strip()]
    prompts = cap_lengths(prompts, source)
    if not prompts:
        raise UserError(f"prompt file {source} holds no instructions; give a non-empty prompt list.")
    if n is not None and n < len(prompts):
        prompts = sample(prompts, n, seed)
    return prompts


MAX_PROMPT_CHARS = 32_768
"""Characters kept of one instruction. No refusal benchmark comes close; a longer one is almost certainly a
broken file, and tokenizing millions of characters costs gigabytes before the context limit could cut it."""


def cap_lengths(prompts: list[Prompt], source: str, max_chars: int = MAX_PROMPT_CHARS) -> list[Prompt]:
    """Cut instructions to ``max_chars`` characters, warning once with how many were cut."""
    long = sum(len(p.instruction) > max_chars for p in prompts)
    if not long:
        return prompts
    warnings.warn(
        f"{source}: {long} instruction(s) longer than {max_chars} characters were cut to that length.", stacklevel=2
    )
    return [Prompt(p.instruction[:max_chars], p.category) if len(p.instruction) > max_chars else p for p in prompts]


def sample(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """A deterministic sample of ``n`` items in their original order (all of them when there are fewer)."""
    items = list(items)
    if n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _load_file(path: Path, column: str | None) -> list[Prompt]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or similar single-list wrappers
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of strings or objects.")
            return _from_records(data, str(path), column)
        if suffix == ".jsonl":
            records = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:  # exc.lineno would count within this one line
                    raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix that line.") from None
            return _from_records(records, str(path), column)
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
            return _from_records(rows, str(path), column)
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError("reading Parquet needs pyarrow: pip install 'refusal-lens[data]'.") from None
            return _from_records(pq.read_table(path).to_pylist(), str(path), column)
        if suffix == ".txt":
            return [Prompt(ln.strip()) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix the file.") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 or give a JSON/CSV file."
        ) from None
    raise UserError(f"{path}: unknown prompt file type {suffix!r}; use .json, .jsonl, .csv, .parquet or .txt.")


def _load_hub(name: str, column: str | None, split: str) -> list[Prompt]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name} looks like a hub dataset id; install 'refusal-lens[data]' to load it.") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load dataset {name} (split {split}): {first}") from None
    return _from_records(list(ds), name, column)
