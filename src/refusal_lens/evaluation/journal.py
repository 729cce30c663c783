"""A journal of generated replies, so a killed evaluation can resume where it stopped.

:func:`~refusal_lens.evaluation.generation.generate` appends every finished batch to the journal as one JSON
line (flushed at once, so a ``kill -9`` loses at most the batch in flight). A resumed run replays the batches
already in the journal instead of generating them again. Every batch is seeded from ``(seed, batch index)``
and batches are cut the same way, so the replayed and the regenerated replies are the replies an
uninterrupted run makes: the results are byte-identical.

The first line holds a fingerprint of everything that changes the replies (model, direction, prompts,
settings, template); a journal with another fingerprint is refused, never mixed in.

Example:
    >>> journal = CompletionJournal("out/completions.jsonl", fingerprint="...", resume=True)  # doctest: +SKIP
    >>> generate(model, tok, prompts, settings=s, journal=journal)                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import UserError

JOURNAL_VERSION = 1


def fingerprint(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys): equal settings give equal fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def read_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The journal's first line, or None if there is no readable journal at ``path``."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) and "journal" in head else None


class CompletionJournal:
    """Batches of completions keyed by ``(intervention, prompt_set, batch index)``, appended to a JSONL file."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, resume: bool = False):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        lines: list[str] = []
        if resume and self.path.is_file():
            lines = self._replay()
        header = json.dumps({"journal": JOURNAL_VERSION, "fingerprint": fingerprint})
        # Rewrite without a batch line a kill may have cut short, then append from there.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in [header, *lines]), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole evaluation

    def _replay(self) -> list[str]:
        head = read_header(self.path)
        if head is None or head.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"the partial evaluation in {self.path.parent} was made with other inputs or options; "
                "rerun without --resume (it is then discarded) or with the same options."
            )
        kept = []
        with open(self.path, encoding="utf-8") as fh:
            fh.readline()
            for line in fh:
                try:
                    rec = json.loads(line)
                    key = (str(rec["key"][0]), str(rec["key"][1]), int(rec["key"][2]))
                    rows = list(rec["rows"])
                except (ValueError, KeyError, TypeError, IndexError):
                    break  # the batch in flight when the run was killed
                self.done[key] = rows
                kept.append(line.rstrip("\n"))
        return kept

    def get(self, intervention: str, prompt_set: str | None, batch: int, n: int) -> list[dict[str, Any]] | None:
        """The journaled rows of a batch of ``n`` prompts, or None if it has to be generated."""
        rows = self.done.get((intervention, str(prompt_set), batch))
        return rows if rows is not None and len(rows) == n else None

    def add(self, intervention: str, prompt_set: str | None, batch: int, rows: list[dict[str, Any]]) -> None:
        key = [intervention, str(prompt_set), batch]
        self._fh.write(json.dumps({"key": key, "rows": rows}, ensure_ascii=False) + "\n")
        self._fh.flush()  # in the OS's hands now: survives a kill of this process
        self.done[(intervention, str(prompt_set), batch)] = rows

    def close(self) -> None:
        self._fh.close()

    def __len__(self) -> int:
        return len(self.done)
