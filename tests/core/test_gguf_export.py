"""Writing an edited model as GGUF, on a tiny Llama GGUF made here (real weights: tests/real/test_gguf_export.py).

The tiny file is written the way llama.cpp's converter lays out a Llama (q/k rows permuted per head with the
converter's reshape/swap, 2-D weights quantized to Q8_0, norms F32, tied embeddings without ``output.weight``);
transformers reads it back (its own inverse permutation and dequantization), so the reference for every check
is an implementation other than ours.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.core.gguf import describe_gguf
from refusal_lens.testing import random_model

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")),
    reason='needs gguf and accelerate (transformers reads GGUF with them): pip install -e ".[dev]"',
)


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order, as its converter writes it (reshape to heads × 2 × half, swap the last two)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama_gguf(path, model) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", cfg.num_hidden_layers)
    writer.add_uint32("llama.context_length", 256)
    writer.add_uint32("llama.embedding_length", cfg.hidden_size)
    writer.add_uint32("llama.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32("llama.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32("llama.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32("llama.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    writer.add_uint32("llama.vocab_size", cfg.vocab_size)
    writer.add_string("general.name", "tiny test llama")
    writer.add_array("tokenizer.ggml.token_type", [1] * 4)  # an array field, copied as it is
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: no output.weight in the file
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        array = tensor.numpy()
        if ".attn_q." in name:
            array = _converter_permute(array, cfg.num_attention_heads)
        elif ".attn_k." in name:
            array = _converter_permute(array, cfg.num_key_value_heads)
        if array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array), q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load(path):
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.eval().requires_grad_(False)
    model.refusal_lens_gguf = describe_gguf(path)  # what load_model records for a GGUF input
    return model


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(path, random_model("llama", n_layers=2, d_model=32, n_heads=4, vocab=96, tied=True))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_edited_model_written_as_gguf_loads_back_equal_with_unedited_tensors_copied(tiny_gguf, tmp_path):
    import gguf

    from refusal_lens.core.gguf_export import write_edited_gguf
    from refusal_lens.direction.orthogonalize import orthogonalize_model

    model = _load(tiny_gguf)
    assert model.config.tie_word_embeddings
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    edited = orthogonalize_model(model, direction)  # embeddings (untied now), o_proj, down_proj
    with torch.no_grad():  # a q and a k edit too: the head permutation has to be redone on write
        model.model.layers[1].self_attn.q_proj.weight.mul_(1.5)
        model.model.layers[0].self_attn.k_proj.weight.add_(0.01)
    info = write_edited_gguf(model, tmp_path / "out" / "model.gguf")
    back = _load(tmp_path / "out" / "model.gguf")
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    assert not back.config.tie_word_embeddings  # output.weight was added
    assert (_logits(back, ids) - _logits(model, ids)).abs().max() < 1e-5
    sd, sd_back = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)  # F32: every weight exactly
    src, out = gguf.GGUFReader(str(tiny_gguf)), gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    src_t, out_t = {t.name: t for t in src.tensors}, {t.name: t for t in out.tensors}
    changed = {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.attn_k.weight"}
    changed |= {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_output", "ffn_down")}
    assert set(info["edited_tensors"]) == changed and len(edited) == 5
    assert info["added_tensors"] == ["output.weight"] and set(out_t) == set(src_t) | {"output.weight"}
    for name, t in out_t.items():
        if name in changed:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        else:  # untouched tensors keep their quantized bytes; the unembedding is the original embedding's
            ref = src_t["token_embd.weight" if name == "output.weight" else name]
            assert t.tensor_type == ref.tensor_type and np.array_equal(t.data, ref.data)
    meta = {k: f.contents() for k, f in out.fields.items() if not k.startswith("GGUF.")}
    assert meta == {k: f.contents() for k, f in src.fields.items() if not k.startswith("GGUF.")}


def test_f16_halves_the_edited_tensors_and_bad_inputs_are_user_errors(tiny_gguf, tmp_path):
    from refusal_lens.core.gguf_export import write_edited_gguf
    from refusal_lens.direction.orthogonalize import orthogonalize_model

    model = _load(tiny_gguf)
    orthogonalize_model(model, torch.randn(32, generator=torch.Generator().manual_seed(1)))
    f32 = write_edited_gguf(model, tmp_path / "a.gguf")
    f16 = write_edited_gguf(model, tmp_path / "b.gguf", "f16")
    assert f16["edited_dtype"] == "F16" and f16["size_bytes"] < f32["size_bytes"]
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    assert (_logits(_load(tmp_path / "b.gguf"), ids) - _logits(model, ids)).abs().max() < 1e-2
    with pytest.raises(UserError, match="not loaded from a GGUF file"):
        write_edited_gguf(random_model("llama"), tmp_path / "c.gguf")
    with pytest.raises(UserError, match="f8 is unknown"):
        write_edited_gguf(model, tmp_path / "c.gguf", "f8")
    other = random_model("llama", n_layers=3, d_model=32, n_heads=4, vocab=96, tied=True)
    with pytest.raises(UserError, match="is not the GGUF file's"):  # a model that is not this file's
        write_edited_gguf(other, tmp_path / "c.gguf", source=tiny_gguf)
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:-1] + b"\x01")  # the file changed since the load
    with pytest.raises(UserError, match="changed since the model was loaded"):
        write_edited_gguf(model, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists()


def test_console_script_refuses_a_gguf_export_for_a_hf_input_before_any_work(saved_model, tmp_path):
    from ..cli.console import run_cli

    run = run_cli("orthogonalize", "--model", str(saved_model), "--direction", "d", "--out", "o", "--gguf", "f16",
                  cwd=tmp_path, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--gguf f16 needs a GGUF input" in run.stderr and not (tmp_path / "o").exists()
