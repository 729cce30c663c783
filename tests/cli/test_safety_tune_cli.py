"""``refusal-lens organism safety-tune`` through the command line, on a tiny random model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..conftest import HARMFUL, HARMLESS


def _cli(*args, env):
    code = "import sys; from refusal_lens.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_safety_tune_writes_a_peft_adapter_and_refuses_to_overwrite(saved_model, tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps([{"instruction": p} for p in HARMFUL]))
    harmless.write_text(json.dumps([{"instruction": p} for p in HARMLESS]))
    env = {**os.environ, "REFUSAL_LENS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "adapter"
    base = ["organism", "safety-tune", "--model", str(saved_model), "--harmful", str(harmful), "--harmless",
            str(harmless), "--n-harmful", "3", "--n-harmless", "3", "--reply-tokens", "3", "--steps", "2",
            "--batch-size", "3", "--rank", "2", "--targets", "q_proj", "--quiet"]  # fmt: skip
    done = _cli(*base, "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    replies = json.loads((out / "own_replies.json").read_text())
    assert len(replies["prompts"]) == 3 + 24  # harmless + the borderline training prompts
    before = (out / "adapter_model.safetensors").read_bytes()
    again = _cli(*base, "--out", str(out), env=env)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before
    # the same seed and the written targets rebuild the identical adapter (--force replaces the folder)
    rebuilt = _cli(*base, "--out", str(out), "--force", "--replies", str(out / "own_replies.json"), env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
