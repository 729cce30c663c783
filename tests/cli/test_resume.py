"""``evaluate --resume`` after a real ``kill -9``: the same bytes as an uninterrupted run, nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_lens.organism import shipped_direction

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "SOURCE_DATE_EPOCH": "0"}
CLI = [shutil.which("refusal-lens")] if shutil.which("refusal-lens") else [
    sys.executable, "-c", "import sys; from refusal_lens.cli.main import main; sys.exit(main(sys.argv[1:]))"
]  # fmt: skip


def _args(out: Path) -> list[str]:
    return [*CLI, "evaluate", "--direction", str(shipped_direction()), "--intervention", "ablate",
            "--n-prompts", "4", "--batch-size", "2", "--max-new-tokens", "8", "--n-ce", "2", "--no-report",
            "--quiet", "--out", str(out)]  # fmt: skip


@pytest.mark.slow
def test_killed_evaluate_resumes_to_identical_bytes(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_args(ref), env=ENV, check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_args(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / f".out.partial-{proc.pid}" / "completions.jsonl"
    while proc.poll() is None and (not journal.exists() or journal.read_text().count("\n") < 4):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*_args(out), "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming: 3 batch(es)" in done.stdout or "resuming: 4 batch(es)" in done.stdout, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]
    for name in ("results.json", "completions.jsonl", "provenance.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
