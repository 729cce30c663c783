"""Architecture adapters, hook ablation and weight orthogonalization on every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lens.core.adapters import FAMILIES as ADAPTED
from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.errors import UserError
from refusal_lens.core.hooks import module_output_hooks, site_hooks
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.interventions import ablate_direction
from refusal_lens.direction.orthogonalize import orthogonalize_checkpoint, orthogonalize_model
from refusal_lens.testing import FAMILIES, random_model

PRE_NORM = [f for f in FAMILIES if not ADAPTED[f].post_norms]
POST_NORM = [f for f in FAMILIES if ADAPTED[f].post_norms]
PROMPTS = ["how do i bake bread", "hi there friend, write a poem about the sea please", "x"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    return ChatFormatter(tokenizer).encode(PROMPTS)


def _direction(model, seed=3):
    d = get_adapter(model).d_model
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_part(family):
    model = random_model(family, n_layers=2)
    adapter = get_adapter(model)
    assert adapter.n_layers == 2 and adapter.d_model == 32
    writers = {w.name for w in adapter.residual_writers()}
    params = dict(model.named_parameters())
    assert all(name in params for name in writers)
    # every layer contributes an attention and an MLP writer (an expert bank counts once)
    for layer in range(2):
        assert any(f".{layer}." in n and ("o_proj" in n or "c_proj" in n or "dense" in n) for n in writers)
    assert adapter.embed.weight.shape[1] == 32


def test_unsupported_architecture_is_a_clear_error():
    class Fake(torch.nn.Module):
        class config:  # noqa: N801 - mimics a HF config attribute
            model_type = "mamba"

    with pytest.raises(UserError, match="unsupported architecture 'mamba'; supported: .*llama"):
        get_adapter(Fake())


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_ablation_leaves_no_component_in_any_write(family, batch):
    model = random_model(family, n_layers=2)
    adapter = get_adapter(model)
    r = _direction(model)
    u = (r / r.norm()).double()
    seen = []

    def record(x):
        seen.append(x.detach().double())

    with ablate_direction(model, r):
        # record after the ablation hooks, which were registered first and so run first
        sites = {(layer, "resid_pre"): record for layer in range(adapter.n_layers)}
        with site_hooks(model, sites), module_output_hooks(adapter.residual_writes(), record):
            model(**batch)
    assert len(seen) == 3 * adapter.n_layers
    for x in seen:
        rel = (x @ u).abs().max() / x.norm(dim=-1).max()
        assert rel < 1e-6
    # and without ablation the writes do have a component (the test could fail)
    seen.clear()
    with module_output_hooks(adapter.residual_writes(), record):
        model(**batch)
    assert max(float((x @ u).abs().max()) for x in seen) > 1e-3


@pytest.mark.parametrize("family", PRE_NORM)
def test_orthogonalized_weights_equal_hook_ablation(family, batch, tmp_path):
    model = random_model(family, n_layers=2)
    r = _direction(model)
    with ablate_direction(model, r):
        hooked = model(**batch).logits
    plain = model(**batch).logits
    assert (plain - hooked).abs().max() > 1e-3  # the intervention does something

    edited = copy.deepcopy(model)
    orthogonalize_model(edited, r)
    assert (edited(**batch).logits - hooked).abs().max() < 1e-4

    model.save_pretrained(tmp_path / "src")
    orthogonalize_checkpoint(tmp_path / "src", r, tmp_path / "out")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (streamed(**batch).logits - hooked).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_tied_embeddings_are_untied_so_the_unembedding_keeps_its_weights(family, tmp_path):
    model = random_model(family, n_layers=2)
    adapter = get_adapter(model)
    assert adapter.tied_embeddings()
    head_before = model.get_output_embeddings().weight.detach().clone()
    r = _direction(model)
    edited = copy.deepcopy(model)
    orthogonalize_model(edited, r)
    assert torch.equal(edited.get_output_embeddings().weight, head_before)
    assert not torch.equal(edited.get_input_embeddings().weight, head_before)
    model.save_pretrained(tmp_path / "src")
    orthogonalize_checkpoint(tmp_path / "src", r, tmp_path / "out")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(streamed.get_output_embeddings().weight, head_before)


@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_families_refuse_inexact_edit_unless_forced(family, tmp_path):
    model = random_model(family, n_layers=2)
    r = _direction(model)
    with pytest.raises(UserError, match="not exact"):
        orthogonalize_model(copy.deepcopy(model), r)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(UserError, match="not exact"):
        orthogonalize_checkpoint(tmp_path / "src", r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    orthogonalize_model(model, r, force=True)  # allowed when asked


def test_streaming_over_several_shards_matches_in_memory(batch, tmp_path):
    model = random_model("qwen2", n_layers=3, d_model=64)
    r = _direction(model)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    shards = list((tmp_path / "src").glob("*.safetensors"))
    assert len(shards) > 2
    summary = orthogonalize_checkpoint(tmp_path / "src", r, tmp_path / "out")
    assert len(summary["shards"]) == len(shards)
    in_memory = copy.deepcopy(model)
    orthogonalize_model(in_memory, r)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (streamed(**batch).logits - in_memory(**batch).logits).abs().max() < 1e-5


def test_hooks_are_removed_even_when_the_block_raises(llama, batch):
    r = _direction(llama)
    before = llama(**batch).logits
    with pytest.raises(RuntimeError), ablate_direction(llama, r):
        raise RuntimeError("boom")
    assert torch.equal(llama(**batch).logits, before)
