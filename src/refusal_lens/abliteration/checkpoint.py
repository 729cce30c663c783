"""The search's checkpoint: every scored point appended to a JSON Lines file as soon as it is scored, so an
interrupted search resumes where it stopped (a rerun with the same inputs reads the points back)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .points import Point


class Checkpoint:
    """Evaluated points in a JSON Lines file: a header with the inputs' fingerprint, then one point per line."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            lines = [json.loads(s) for s in self.path.read_text(encoding="utf-8").splitlines() if s.strip()]
            if not lines or lines[0].get("fingerprint") != self.fingerprint:
                raise UserError(
                    f"search checkpoint {self.path} was written for other inputs or options; remove it to start "
                    "over, or give another --out."
                )
            for row in lines[1:]:
                self.rows[Point.from_json(row["point"]).key()] = row
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n", encoding="utf-8")

    def add(self, row: dict[str, Any]) -> None:
        # one short line per write, flushed: an interruption loses at most the point being scored
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[Point.from_json(row["point"]).key()] = row
