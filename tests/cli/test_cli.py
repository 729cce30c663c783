"""The command line: help, a full run on a tiny model, and bad inputs (one line, non-zero, no partial output)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lens.cli.main import main
from refusal_lens.direction.compute import Direction

from ..conftest import HARMFUL, HARMLESS


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps(HARMFUL))
    harmless.write_text(json.dumps([{"instruction": h} for h in HARMLESS]))
    return harmful, harmless


def _direction_args(model, harmful, harmless, out):
    return [
        "direction",
        "--model",
        str(model),
        "--harmful",
        str(harmful),
        "--harmless",
        str(harmless),
        "--out",
        str(out),
        "--refusal-tokens",
        "5",
        "--no-filter-data",
        "--kl-threshold",
        "1e9",
        "--induce-threshold=-1e9",
        "--n-val",
        "2",
    ]


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "refusal_lens.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "direction" in out.stdout and "orthogonalize" in out.stdout


def test_direction_then_orthogonalize_end_to_end(saved_model, prompt_files, tmp_path, capsys):
    harmful, harmless = prompt_files
    assert main(_direction_args(saved_model, harmful, harmless, tmp_path / "d")) == 0
    d = Direction.load(tmp_path / "d")
    selection = json.loads((tmp_path / "d" / "selection.json").read_text())
    assert len(selection["candidates"]) == d.candidates.shape[0] * d.candidates.shape[1]
    assert (
        main(
            [
                "orthogonalize",
                "--model",
                str(saved_model),
                "--direction",
                str(tmp_path / "d"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    u = d.vector / d.vector.norm()
    assert (edited.model.layers[0].self_attn.o_proj.weight.T @ u).abs().max() < 1e-5
    assert json.loads((tmp_path / "o" / "refusal_lens_orthogonalization.json").read_text())["layer"] == d.layer


def _fails(argv, capsys, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and pattern in errors[0] and err.endswith(errors[0]), err
    return err


def test_bad_inputs_give_one_line_and_leave_no_output(saved_model, prompt_files, tmp_path, capsys):
    harmful, harmless = prompt_files
    out = tmp_path / "out"
    (tmp_path / "empty.json").write_text("[]")
    _fails(_direction_args(saved_model, tmp_path / "empty.json", harmless, out), capsys, "holds no instructions")
    _fails(_direction_args(saved_model, tmp_path / "nope.json", harmless, out), capsys, "does not exist")
    _fails(_direction_args(tmp_path / "no-model", harmful, harmless, out), capsys, "model path")
    _fails(_direction_args(saved_model, harmful, harmless, out) + ["--layer", "9"], capsys, "layer 9 is out of range")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging leftovers

    # no chat template
    cfg = json.loads((saved_model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (saved_model / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in saved_model.glob("chat_template.*"):
        f.unlink()
    _fails(_direction_args(saved_model, harmful, harmless, out), capsys, "no chat template")
    assert not out.exists()


def test_wrong_width_direction_and_nan_model(saved_model, prompt_files, tmp_path, capsys):
    Direction(torch.ones(48), 1, -1).save(tmp_path / "wide")
    _fails(
        [
            "orthogonalize",
            "--model",
            str(saved_model),
            "--direction",
            str(tmp_path / "wide"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        "hidden size is 32",
    )
    assert not (tmp_path / "o").exists()

    model = AutoModelForCausalLM.from_pretrained(saved_model)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    model.save_pretrained(saved_model)
    harmful, harmless = prompt_files
    _fails(_direction_args(saved_model, harmful, harmless, tmp_path / "d"), capsys, "NaN")
    assert not (tmp_path / "d").exists()
