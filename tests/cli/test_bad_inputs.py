"""Bad inputs to every command, through the installed ``refusal-lens`` script in subprocesses (issue #14).

Each case must exit with status 2 and print one line naming the input, with no traceback; afterwards the
workspace holds exactly the files it held before, byte for byte (nothing partial, nothing of the user's
deleted, moved or changed). Every case runs in its own copy of a small workspace (a tiny random model, its
directions, prompt files, a user's non-empty folder and a user's file); the cases run three at a time in one
fixture, because each subprocess spends most of its time importing torch and transformers.

The whole table takes about 3.5 CPU minutes (89 subprocesses); the default suite runs the cases in
``FAST`` (every command, every kind of check) and ``-m slow`` runs the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from refusal_lens.direction.compute import Direction
from refusal_lens.testing import random_model, toy_tokenizer

from ..conftest import HARMFUL, HARMLESS

SCRIPT = shutil.which("refusal-lens")
D = "dir/direction.safetensors"
Z = "zero/direction.safetensors"
M = ["--model", "../model"]
H = ["--harmful", "p/harmful.json", "--harmless", "p/harmless.json"]

# (case id, arguments (paths relative to the workspace's work/ folder), text the error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    # direction
    ("direction-batch-size-0", ["direction", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("direction-n-train-negative", ["direction", "--out", "o", "--n-train", "-5"], "--n-train"),
    ("direction-kl-threshold-nan", ["direction", "--out", "o", "--kl-threshold", "nan"], "--kl-threshold"),
    ("direction-layer-fraction-2", ["direction", "--out", "o", "--max-layer-fraction", "2"], "--max-layer-fraction"),
    ("direction-out-nonempty", ["direction", "--out", "keep"], "--overwrite"),
    ("direction-out-is-file", ["direction", "--out", "file.txt"], "file.txt"),
    ("direction-out-cwd", ["direction", "--out", "."], "current folder"),
    ("direction-out-parent-of-cwd", ["direction", "--out", ".."], "current folder"),
    ("direction-out-unwritable", ["direction", "--out", "/proc/refusal-lens-out"], "/proc/refusal-lens-out"),
    ("direction-out-contains-prompts", ["direction", *M, *H, "--out", "p"], "p/harmful.json"),
    ("direction-out-inside-model", ["direction", *M, *H, "--out", "../model/sub"], "../model"),
    ("direction-non-utf8", ["direction", "--harmful", "p/latin1.txt", "--out", "o"], "p/latin1.txt"),
    ("direction-jsonl-line", ["direction", "--harmful", "p/broken.jsonl", "--out", "o"], "line 3"),
    ("direction-empty-prompts", ["direction", "--harmful", "p/empty.json", "--out", "o"], "p/empty.json"),
    ("direction-missing-prompts", ["direction", "--harmful", "p/missing.json", "--out", "o"], "p/missing.json"),
    ("direction-unknown-type", ["direction", "--harmful", "p/prompts.xyz", "--out", "o"], "p/prompts.xyz"),
    ("direction-no-column", ["direction", "--harmful", "p/nocolumn.json", "--out", "o"], "--column"),
    ("direction-template-not-utf8", ["direction", "--chat-template", "p/latin1.txt", "--out", "o"], "p/latin1.txt"),
    ("direction-device-cuda7", ["direction", "--device", "cuda:7", "--out", "o"], "cuda:7"),
    ("direction-bad-dtype", ["direction", "--dtype", "float8", "--out", "o"], "float8"),
    ("direction-missing-model", ["direction", "--model", "./nomodel", *H, "--out", "o"], "nomodel"),
    ("direction-layer-outside", ["direction", "--layer", "99", "--position", "-1", "--out", "o"], "layer 99"),
    ("direction-model-without-prompts", ["direction", *M, "--out", "o"], "--harmful"),
    # orthogonalize (streaming unless --in-memory)
    ("ortho-out-is-model", ["orthogonalize", *M, "--direction", D, "--out", "../model"], "../model"),
    ("ortho-out-contains-direction", ["orthogonalize", *M, "--direction", D, "--out", "dir"], "dir"),
    ("ortho-out-nonempty", ["orthogonalize", *M, "--direction", D, "--out", "keep"], "--overwrite"),
    ("ortho-out-is-file", ["orthogonalize", *M, "--direction", D, "--out", "file.txt"], "file.txt"),
    ("ortho-zero-direction", ["orthogonalize", *M, "--direction", Z, "--out", "o"], "norm"),
    ("ortho-zero-direction-in-memory", ["orthogonalize", *M, "--direction", Z, "--out", "o", "--in-memory"], "norm"),
    ("ortho-truncated-shard", ["orthogonalize", "--model", "../truncated", "--direction", D, "--out", "o"], "shard"),
    ("ortho-corrupted-shard", ["orthogonalize", "--model", "../corrupted", "--direction", D, "--out", "o"], "shard"),
    ("ortho-wrong-width", ["orthogonalize", *M, "--direction", "wide/direction.safetensors", "--out", "o"], "32"),
    ("ortho-missing-direction", ["orthogonalize", *M, "--direction", "nodir/d.safetensors", "--out", "o"], "nodir"),
    ("ortho-direction-not-safetensors", ["orthogonalize", *M, "--direction", "p/harmful.json", "--out", "o"], "p/"),
    ("ortho-missing-model", ["orthogonalize", "--model", "./nomodel", "--direction", D, "--out", "o"], "nomodel"),
    # evaluate
    ("evaluate-coeff-nan", ["evaluate", "--out", "o", "--coeff", "nan"], "--coeff"),
    ("evaluate-coeff-inf", ["evaluate", "--out", "o", "--coeff", "inf"], "--coeff"),
    ("evaluate-top-p-2", ["evaluate", "--out", "o", "--do-sample", "--top-p", "2"], "--top-p"),
    ("evaluate-temperature-negative", ["evaluate", "--out", "o", "--temperature", "-1"], "--temperature"),
    ("evaluate-temperature-0", ["evaluate", "--out", "o", "--temperature", "0"], "--temperature"),
    ("evaluate-batch-size-0", ["evaluate", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("evaluate-max-new-tokens-0", ["evaluate", "--out", "o", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("evaluate-n-prompts-0", ["evaluate", "--out", "o", "--n-prompts", "0"], "--n-prompts"),
    ("evaluate-coeff-text", ["evaluate", "--out", "o", "--coeff", "big"], "--coeff"),
    ("evaluate-unknown-intervention", ["evaluate", "--out", "o", "--direction", D, "--intervention", "x"], "x"),
    ("evaluate-intervention-needs-direction", ["evaluate", "--out", "o", "--intervention", "ablate"], "--direction"),
    ("evaluate-zero-direction", ["evaluate", "--out", "o", "--direction", Z], "norm"),
    ("evaluate-out-nonempty", ["evaluate", "--out", "keep"], "--overwrite"),
    ("evaluate-out-contains-direction", ["evaluate", "--out", "dir", "--direction", D], "dir"),
    (
        "evaluate-non-utf8",
        ["evaluate", *M, "--harmful", "p/latin1.txt", "--harmless", "p/harmless.json", "--out", "o"],
        "p/latin1.txt",
    ),  # fmt: skip
    ("evaluate-missing-plain-text", ["evaluate", "--out", "o", "--plain-text", "p/missing.txt"], "p/missing.txt"),
    ("evaluate-plain-text-not-utf8", ["evaluate", "--out", "o", "--plain-text", "p/latin1.txt"], "p/latin1.txt"),
    ("evaluate-bad-instruction-data", ["evaluate", "--out", "o", "--instruction-data", "p/harmful.json"], "p/"),
    ("evaluate-judge-mode", ["evaluate", "--out", "o", "--judge-mode", "x"], "--judge-mode"),
    ("evaluate-device-cuda7", ["evaluate", "--out", "o", "--device", "cuda:7"], "cuda:7"),
    # upstream
    # abliterate
    ("abliterate-out-nonempty", ["abliterate", "--out", "keep"], "--overwrite"),
    ("abliterate-out-contains-prompts", ["abliterate", *M, *H, "--out", "p"], "p/harmful.json"),
    ("abliterate-max-kl-nan", ["abliterate", "--max-kl", "nan", "--out", "o"], "--max-kl"),
    ("abliterate-max-refusal-2", ["abliterate", "--max-refusal", "2", "--out", "o"], "--max-refusal"),
    ("abliterate-unknown-export", ["abliterate", "--export", "onnx", "--out", "o"], "--export"),
    ("abliterate-missing-task-file", ["abliterate", "--lm-eval", "p/missing.yaml", "--out", "o"], "p/missing.yaml"),
    ("abliterate-gguf-for-hf-input", ["abliterate", *M, *H, "--gguf", "f16", "--out", "o"], "--gguf f16"),
    # capability (no --out: it prints)
    ("capability-nothing-to-measure", ["capability", *M], "--lm-eval"),
    ("capability-missing-task-file", ["capability", "--lm-eval", "p/missing.yaml"], "p/missing.yaml"),
    ("capability-task-not-yaml", ["capability", "--lm-eval", "p/harmful.yaml"], "task: NAME"),
    ("capability-ce-negative", ["capability", "--n-ce", "-1"], "--n-ce"),
    ("ortho-gguf-for-hf-input", ["orthogonalize", *M, "--direction", D, "--out", "o", "--gguf", "f32"], "--gguf f32"),
    ("upstream-empty-prompt", ["upstream", "--prompt", "", "--out", "o"], "--prompt"),
    ("upstream-blank-prompt", ["upstream", "--prompt", "   ", "--out", "o"], "--prompt"),
    ("upstream-top-0", ["upstream", "--prompt", "hi", "--top", "0", "--out", "o"], "--top"),
    ("upstream-steer-alpha-nan", ["upstream", "--prompt", "hi", "--steer-alpha", "nan", "--out", "o"], "--steer-alpha"),
    ("upstream-target-layer-negative", ["upstream", "--prompt", "hi", "--target-layer", "-1", "--out", "o"], "layer"),
    (
        "upstream-target-position-outside",
        ["upstream", "--prompt", "hi", "--target-position", "999", "--out", "o"],
        "--target-position",
    ),  # fmt: skip
    ("upstream-out-nonempty", ["upstream", "--prompt", "hi", "--out", "keep"], "--overwrite"),
    ("upstream-zero-direction", ["upstream", "--prompt", "hi", "--direction", Z, "--out", "o"], "norm"),
    # sae train / eval / decompose
    ("sae-train-tokens-negative", ["sae", "train", "--layer", "1", "--out", "o", "--tokens", "-5"], "--tokens"),
    ("sae-train-batch-size-0", ["sae", "train", "--layer", "1", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("sae-train-lr-nan", ["sae", "train", "--layer", "1", "--out", "o", "--lr", "nan"], "--lr"),
    ("sae-train-k-0", ["sae", "train", "--layer", "1", "--out", "o", "--k", "0"], "--k"),
    ("sae-train-warmup-2", ["sae", "train", "--layer", "1", "--out", "o", "--lr-warmup-frac", "2"], "--lr-warmup"),
    ("sae-train-layer-negative", ["sae", "train", "--layer", "-1", "--out", "o"], "--layer"),
    ("sae-train-unknown-arch", ["sae", "train", "--layer", "1", "--out", "o", "--arch", "bogus"], "bogus"),
    ("sae-train-out-nonempty", ["sae", "train", "--layer", "1", "--out", "keep"], "--overwrite"),
    ("sae-train-out-is-file", ["sae", "train", "--layer", "1", "--out", "file.txt"], "file.txt"),
    (
        "sae-train-data-file-not-utf8",
        ["sae", "train", "--layer", "1", "--out", "o", "--data-file", "p/latin1.txt"],
        "p/latin1.txt",
    ),  # fmt: skip
    ("sae-eval-missing-sae", ["sae", "eval", "--sae", "nosae"], "nosae"),
    ("sae-eval-out-exists", ["sae", "eval", "--sae", "dir", "--out", "file.txt"], "file.txt"),
    ("sae-eval-tokens-0", ["sae", "eval", "--sae", "dir", "--tokens", "0"], "--tokens"),
    ("sae-decompose-n-prompts-0", ["sae", "decompose", "--out", "o", "-n", "0"], "--n-prompts"),
    ("sae-decompose-max-k-negative", ["sae", "decompose", "--out", "o", "--max-k", "-1"], "--max-k"),
    ("sae-decompose-out-nonempty", ["sae", "decompose", "--out", "keep"], "--overwrite"),
    ("sae-decompose-zero-direction", ["sae", "decompose", "--out", "o", "--direction", Z], "norm"),
    # demo, organism, report
    ("demo-n-prompts-0", ["demo", "--out", "o", "--n-prompts", "0"], "--n-prompts"),
    ("demo-max-new-tokens-negative", ["demo", "--out", "o", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("demo-out-nonempty", ["demo", "--out", "keep"], "--overwrite"),
    ("organism-train-out-nonempty", ["organism", "train", "--out", "keep"], "--overwrite"),
    ("organism-train-steps-0", ["organism", "train", "--out", "o", "--steps", "0"], "--steps"),
    ("organism-artifacts-needs-checkpoint", ["organism", "artifacts"], "--checkpoint"),
    ("organism-artifacts-missing-checkpoint", ["organism", "artifacts", "--checkpoint", "./nomodel"], "nomodel"),
    ("report-missing-folder", ["report", "noresults"], "noresults"),
    ("report-out-exists", ["report", "keep", "--out", "file.txt"], "file.txt"),
]


# Run by default: at least one case per command and per kind of failure (option range, non-finite number,
# --out onto user data / an input / the current folder / a file / an unwritable place, bad file contents,
# bad model or direction). The others are marked slow.
FAST = {
    "direction-batch-size-0", "direction-out-nonempty", "direction-out-cwd", "direction-out-unwritable",
    "direction-out-contains-prompts", "direction-non-utf8", "direction-jsonl-line", "direction-device-cuda7",
    "ortho-out-is-model", "ortho-zero-direction", "ortho-truncated-shard", "ortho-out-is-file",
    "evaluate-coeff-nan", "evaluate-top-p-2", "evaluate-temperature-negative", "evaluate-out-contains-direction",
    "upstream-empty-prompt", "sae-train-tokens-negative", "sae-eval-out-exists", "sae-decompose-out-nonempty",
    "demo-out-nonempty", "organism-artifacts-needs-checkpoint", "report-out-exists", "abliterate-out-nonempty",
    "abliterate-max-refusal-2", "capability-missing-task-file", "capability-nothing-to-measure",
}  # fmt: skip
PARAMS = [pytest.param(c, id=c[0], marks=() if c[0] in FAST else pytest.mark.slow) for c in CASES]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) with its sha256 ('dir' for folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _workspace(root: Path) -> None:
    """The user's files: a model, directions, prompt files, a non-empty folder and a file."""
    model, tok = random_model("llama", n_layers=4, d_model=32), toy_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    weights = (root / "model" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("corrupted", b"\xff" * 64 + weights[64:])):
        shutil.copytree(root / "model", root / name)
        (root / name / "model.safetensors").write_bytes(data)
    work = root / "work"
    Direction(torch.randn(32), 1, -1).save(work / "dir")
    Direction(torch.zeros(32), 1, -1).save(work / "zero")
    Direction(torch.randn(64), 1, -1).save(work / "wide")
    p = work / "p"
    p.mkdir()
    (p / "harmful.json").write_text(json.dumps(HARMFUL))
    (p / "harmless.json").write_text(json.dumps(HARMLESS))
    (p / "latin1.txt").write_bytes("café crème\nhow to pick a lock\n".encode("latin-1"))
    (p / "broken.jsonl").write_text('{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": \n')
    (p / "empty.json").write_text("[]")
    (p / "nocolumn.json").write_text('[{"foo": "bar"}]')
    (p / "prompts.xyz").write_text("hello")
    (p / "harmful.yaml").write_text("- a list, not a task\n")
    (work / "keep").mkdir()
    (work / "keep" / "notes.txt").write_text("the user's notes")
    (work / "file.txt").write_text("the user's file")


def _run_case(template: Path, base: Path, case: tuple[str, list[str], str]) -> dict:
    name, argv, _ = case
    root = base / name
    shutil.copytree(template, root, symlinks=True)
    before = _snapshot(root)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH", "")])
    cmd = [SCRIPT, *argv] if SCRIPT else [sys.executable, "-c", "import sys; from refusal_lens.cli.main import main; "
                                          "sys.exit(main(sys.argv[1:]))", *argv]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root / "work", env=env, capture_output=True, text=True, timeout=600)
    after = _snapshot(root)
    shutil.rmtree(root, ignore_errors=True)
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "before": before, "after": after}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, dict]:
    """Run every selected case up front, three at a time (the tests then only read the outcomes)."""
    selected = {item.callspec.params["case"][0] for item in request.session.items if "case" in item.fixturenames}
    cases = [c for c in CASES if c[0] in selected]
    template = tmp_path_factory.mktemp("workspace")
    _workspace(template)
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = pool.map(lambda case: _run_case(template, base, case), cases)
        return {case[0]: result for case, result in zip(cases, done)}


def test_matrix_is_large_and_covers_every_command():
    from refusal_lens.cli.main import COMMANDS

    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1][0] for c in CASES} == set(COMMANDS)
    assert {c[1][0] for c in CASES if c[0] in FAST} == set(COMMANDS) and FAST <= {c[0] for c in CASES}


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(outcomes, case):
    name, argv, needle = case
    got = outcomes[name]
    stderr = got["stderr"].strip()
    assert got["rc"] == 2, f"exit {got['rc']}\n{stderr}\n{got['stdout'][-2000:]}"
    assert "Traceback" not in got["stderr"], stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert "error:" in lines[0] and needle in lines[0], lines[0]
    assert got["after"] == got["before"], "files were added, removed or changed:\n" + "\n".join(
        sorted(set(got["after"].items()) ^ set(got["before"].items()))
    )
