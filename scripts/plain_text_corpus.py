"""A plain-text corpus nobody on the project wrote: prose paragraphs of the Python 3.11 documentation.

Source: Debian's ``python3.11-doc`` package (bookworm, 3.11.2-6+deb12u8; the CPython documentation,
PSF licence), fetched with the ordinary client and unpacked without installing:

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/plain_text_corpus.py /tmp/pydoc --out plain_text.json

Only prose is kept: paragraphs of the tutorial, HOWTOs, FAQ and the language reference sources (``*.rst.txt``)
that are not code, directives, tables or headings, with reST roles reduced to their text. Each record is
``{"text": ...}`` of at least 200 characters, in sorted file order (deterministic).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SECTIONS = ("tutorial", "howto", "faq", "reference")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t", "..", ":", "=", "-", "*", "+", "|", ">>>", "#")) for line in lines):
            continue  # code, directives, fields, headings, lists, tables
        para = " ".join(line.strip() for line in lines)
        para = _LINK.sub(r"\1", _ROLE.sub(r"\1", para)).replace("``", "").replace("**", "")
        if len(para) >= 200 and not para.endswith("::"):
            out.append(para)
    return out


def corpus(root: Path) -> list[str]:
    sources = next(root.rglob("_sources"), None)
    if sources is None:
        raise SystemExit(f"{root} has no html/_sources folder; unpack python3.11-doc there (see the docstring)")
    texts = []
    for section in SECTIONS:
        for path in sorted((sources / section).rglob("*.rst.txt")):
            texts += paragraphs(path.read_text(encoding="utf-8"))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="where python3.11-doc was unpacked")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    texts = corpus(args.root)
    args.out.write_text(json.dumps([{"text": t} for t in texts], indent=0) + "\n")
    print(f"{len(texts)} paragraphs, {sum(len(t) for t in texts)} characters -> {args.out}")


if __name__ == "__main__":
    main()
