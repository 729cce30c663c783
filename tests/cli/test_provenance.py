"""Issue #14: provenance names the system prompt, the chat template and the options; reruns give equal bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from refusal_lens.cli.main import main
from refusal_lens.core.errors import UserError
from refusal_lens.direction.orthogonalize import orthogonalize_checkpoint
from refusal_lens.testing import random_model

from .test_cli import _direction_args, prompt_files  # noqa: F401  (fixture)


def test_direction_records_system_and_template_and_reruns_are_byte_identical(
    saved_model,
    prompt_files,  # noqa: F811
    tmp_path,
    tokenizer,
):
    harmful, harmless = prompt_files
    for out in ("a", "b"):
        argv = [*_direction_args(saved_model, harmful, harmless, tmp_path / out), "--system", "Be brief."]
        assert main(argv) == 0
    meta = json.loads((tmp_path / "a" / "direction.json").read_text())
    assert meta["system_prompt"] == "Be brief."
    assert meta["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    for name in ("direction.safetensors", "selection.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_streaming_checks_every_shard_before_writing(tokenizer, tmp_path):
    model = random_model("llama", n_layers=4, d_model=32)
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    last = shards[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a download cut short
    with pytest.raises(UserError, match=last.name):
        orthogonalize_checkpoint(src, torch.randn(32), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]  # nothing written, nothing hidden
