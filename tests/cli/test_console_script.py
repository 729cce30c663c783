"""The installed console script, run as a user runs it: subprocess, clean environment, outside the checkout.

An earlier suite called ``main()`` in-process only, where ``importlib.util`` happened to be imported already, and
so it hid a crash of every command. These tests cannot hide that.
"""

from __future__ import annotations

import json
import re
import time

from refusal_lens.direction.compute import Direction

from ..conftest import HARMFUL, HARMLESS
from .console import run_cli


def test_help_runs_fast_and_lists_every_command(tmp_path):
    start = time.perf_counter()
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "direction", "orthogonalize", "evaluate", "report", "organism", "sae", "upstream"):
        assert command in out.stdout
    # the budget is < 1 s on 2 idle cores (README); 10 s only catches an import of torch on a loaded machine
    assert time.perf_counter() - start < 10


def test_every_command_help_shows_each_default_once(tmp_path):
    for command in (
        "demo", "direction", "orthogonalize", "evaluate", "report", "upstream", "sae train", "sae eval",
        "sae decompose", "sae export", "organism train", "organism artifacts",
    ):  # fmt: skip
        out = run_cli(*command.split(), "--help", cwd=tmp_path)
        assert out.returncode == 0, (command, out.stderr)
        text = " ".join(out.stdout.split())
        assert "(default: None)" not in text, (command, text)
        assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), (command, "a default shown twice")
        assert "``" not in text and ":func:" not in text, (command, "raw markup in help")


def test_system_option_has_one_name_everywhere(tmp_path):
    for command in ("direction", "evaluate", "upstream", "sae train", "sae decompose"):
        out = run_cli(*command.split(), "--help", cwd=tmp_path)
        assert "--system " in out.stdout and "--system-prompt" not in out.stdout, command


def test_carved_validation_is_recorded_as_carved(saved_model, tmp_path):
    """No validation files: direction.json names the training file the validation prompts were carved from."""
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps(HARMFUL * 2))
    harmless.write_text(json.dumps(HARMLESS * 2))
    out = run_cli(
        "direction", "--model", str(saved_model), "--harmful", str(harmful), "--harmless", str(harmless),
        "--out", "d", "--refusal-tokens", "5", "--no-filter-data", "--kl-threshold", "1e9",
        "--induce-threshold=-1e9", "--n-val", "2", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "d" / "direction.json").read_text())["data"]
    assert data["harmful"] == str(harmful) and data["harmless"] == str(harmless)
    for key, source in (("harmful_val", harmful), ("harmless_val", harmless)):
        assert data[key]["carved_from"] == str(source), data[key]
        assert data[key]["n_prompts"] == 2 and data[key]["of"] == 12 and data[key]["seed"] == 0
    assert "harmful val: 2 prompts carved out of" in out.stdout
    assert "organism" not in json.dumps(data)
    Direction.load(tmp_path / "d")  # and the artifact loads


def test_given_validation_files_are_recorded_as_files(saved_model, tmp_path):
    files = {}
    for name, items in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        for suffix in ("", "_val"):
            files[name + suffix] = tmp_path / f"{name}{suffix}.json"
            files[name + suffix].write_text(json.dumps(items))
    out = run_cli(
        "direction", "--model", str(saved_model), "--harmful", str(files["harmful"]), "--harmless",
        str(files["harmless"]), "--harmful-val", str(files["harmful_val"]), "--harmless-val",
        str(files["harmless_val"]), "--out", "d", "--refusal-tokens", "5", "--no-filter-data",
        "--kl-threshold", "1e9", "--induce-threshold=-1e9", "--n-val", "2", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "d" / "direction.json").read_text())["data"]
    assert data == {k: str(v) for k, v in files.items()}
    assert "carved" not in out.stdout
