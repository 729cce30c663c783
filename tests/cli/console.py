"""Run the installed ``refusal-lens`` console script the way a user does: a subprocess, outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def console_script() -> str:
    """The installed ``refusal-lens`` executable (the package must be installed, as the README says)."""
    found = shutil.which("refusal-lens") or str(Path(sys.executable).parent / "refusal-lens")
    if not Path(found).exists():
        pytest.fail("the refusal-lens console script is not installed: run pip install -e . first")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """A user's environment: PATH and HOME only (plus PYTHONPATH when a worktree is tested), one thread."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR") if k in os.environ}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``refusal-lens ARGS`` in ``cwd`` (a temporary folder), with a clean environment."""
    return subprocess.run(
        [console_script(), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )
