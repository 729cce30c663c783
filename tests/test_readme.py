"""Every fenced shell command in README.md runs here through the installed console script, or is marked as not
runnable with a reason; either way its options must exist.

Markers, on the line before a fenced block (HTML comments, invisible on GitHub):

* ``<!-- readme-test: skip: REASON -->``: not run (a hub id, a GPU, a multi-GPU node, minutes of training...).
  Its ``refusal-lens`` commands are still parsed by the console script (``REFUSAL_LENS_PARSE_ONLY=1``), so an
  option the command does not accept fails here.
* ``<!-- readme-test: ci-flags: FLAGS -->``: run, with FLAGS appended to each ``refusal-lens`` command (documented
  options that shrink the work, e.g. ``--n-prompts 4``; later options win in argparse).
* no marker: run as written.

Commands run in order in one temporary folder beside a link to ``../shared`` (the README's relative paths), so a
command can use what an earlier one wrote. A block that is neither marked nor made only of ``refusal-lens``
commands fails: every command is either tested or explicitly excused.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cli.console import run_cli
from .conftest import SHARED

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(?:<!-- readme-test: (?P<marker>.*?) -->\n)?```(?:bash|sh|shell)\n(?P<body>.*?)```", re.S)


@dataclass
class Block:
    line: int
    marker: str | None
    commands: list[list[str]]  # each command as argv (``&&`` chains split, comments dropped)


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        body = m.group("body").replace("\\\n", " ")
        commands = []
        for raw in body.splitlines():
            words = shlex.split(raw, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
        blocks.append(Block(text[: m.start()].count("\n") + 1, m.group("marker"), [c for c in commands if c]))
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _cli(command: list[str]) -> list[str] | None:
    """The console-script arguments of a ``refusal-lens`` command (also under torchrun), else None."""
    if "refusal-lens" not in command:
        return None
    return command[command.index("refusal-lens") + 1 :]


def test_the_readme_has_commands():
    assert len(BLOCKS) >= 8 and any(_cli(c) == ["demo"] for b in BLOCKS for c in b.commands)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"README.md:{b.line}")
def test_every_command_is_runnable_or_excused(block):
    if block.marker and block.marker.startswith("skip:"):
        assert len(block.marker) > len("skip: ") + 10, f"README.md:{block.line}: give the reason it is not run"
        return
    loose = [" ".join(c) for c in block.commands if c[0] != "refusal-lens"]
    assert not loose, f"README.md:{block.line}: mark the block 'skip: REASON' or test these commands: {loose}"


EXCUSED = [b for b in BLOCKS if b.marker and b.marker.startswith("skip:")]


@pytest.mark.parametrize("block", EXCUSED, ids=lambda b: f"README.md:{b.line}")
def test_excused_commands_have_options_their_command_accepts(block, tmp_path):
    for command in block.commands:
        argv = _cli(command)
        if argv is None or "..." in argv:
            continue
        done = run_cli(*argv, cwd=tmp_path, REFUSAL_LENS_PARSE_ONLY="1")
        assert done.returncode == 0, f"README.md:{block.line}: `refusal-lens {' '.join(argv)}`\n{done.stderr}"


@pytest.mark.slow  # ~3 CPU-minutes; .ci/run runs it on every submission (pytest -m slow tests/test_readme.py)
def test_runnable_commands_run_as_written(tmp_path):
    """The README's runnable commands, in order, each through the console script (several minutes in all)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the README's examples read ../shared (CI has it beside the checkout)")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    ran = 0
    for block in BLOCKS:
        if block.marker and block.marker.startswith("skip:"):
            continue
        extra = shlex.split(block.marker.removeprefix("ci-flags:")) if block.marker else []
        for command in block.commands:
            argv = [*_cli(command), *extra]
            done = run_cli(*argv, cwd=work)
            where = f"README.md:{block.line}: `refusal-lens {' '.join(argv)}`"
            assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 5


def test_python_snippets_run_as_written(tmp_path):
    """Each ```python block of the README, run in a fresh interpreter (``...`` bodies are valid Python)."""
    import subprocess
    import sys

    from .cli.console import clean_env

    snippets = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert snippets
    for code in snippets:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"README python snippet failed:\n{code}\n{done.stderr[-3000:]}"
