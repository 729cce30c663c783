"""The LoRA safety-tune recipe on a tiny random model: seeded reproducibility, targets, the merged model."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.core.lora import init_adapter, load_adapter, lora_attached, merge_adapter, save_adapter
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.organism.safety_prompts import REFUSAL_REPLIES
from refusal_lens.organism.safety_tune import SafetyTuneConfig, build_examples, end_of_reply_id, safety_tune
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS

TINY = SafetyTuneConfig(
    n_harmful=4, n_harmless=4, reply_tokens=4, rank=2, steps=3, batch_size=3, targets="q_proj,v_proj"
)


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps([{"instruction": p} for p in HARMFUL]))
    harmless.write_text(json.dumps([{"instruction": p} for p in HARMLESS]))
    return harmful, harmless


def _tune(tokenizer, files, seed=0):
    model = random_model("llama", n_layers=2, d_model=32)
    cfg = SafetyTuneConfig(**{**TINY.__dict__, "seed": seed})
    adapter, info = safety_tune(model, tokenizer, *files, cfg, cache=None, borderline=["how do i kill a process"])
    return model, adapter, info


def test_same_seed_gives_the_identical_adapter_and_another_seed_does_not(tokenizer, prompt_files):
    _, first, info = _tune(tokenizer, prompt_files, seed=0)
    _, again, _ = _tune(tokenizer, prompt_files, seed=0)
    _, other, _ = _tune(tokenizer, prompt_files, seed=1)
    assert sorted(first.a) == sorted(again.a) and len(first.a) == 4  # q and v of two layers
    for name in first.a:
        assert torch.equal(first.a[name], again.a[name]) and torch.equal(first.b[name], again.b[name])
    assert any(not torch.equal(first.b[n], other.b[n]) for n in first.a)
    assert any(b.abs().sum() > 0 for b in first.b.values())  # it trained (B starts at zero)
    assert len(info["losses"]) == 3 and info["data"]["n_training_examples"] == 4 + 4 + 1


def test_refusal_targets_follow_the_prompt_and_end_the_turn(tokenizer):
    fmt = ChatFormatter(tokenizer)
    examples = build_examples(fmt, HARMFUL[:3], [(HARMLESS[0], [5, 6], "harmless")], seed=0)
    variants = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in REFUSAL_REPLIES]
    end = end_of_reply_id(tokenizer, fmt)
    for e, prompt in zip(examples, HARMFUL[:3]):
        assert e.ids[: e.n_prompt] == fmt.token_ids(prompt)
        assert e.ids[e.n_prompt : -1] in variants and e.ids[-1] == end
    assert examples[-1].ids[examples[-1].n_prompt :] == [5, 6]  # own replies are kept as given


def test_merged_adapter_equals_the_hooked_one_and_survives_saving(tmp_path, tokenizer):
    model = random_model("llama", n_layers=2, d_model=32)
    adapter = init_adapter(model, ("q_proj", "down_proj"), rank=2, alpha=4.0, seed=3)
    gen = torch.Generator().manual_seed(0)
    for name in adapter.b:  # a non-zero delta (a fresh adapter is the identity)
        adapter.b[name] = torch.randn(adapter.b[name].shape, generator=gen) * 0.5
    ids = torch.randint(0, 60, (2, 7), generator=gen)
    with torch.no_grad(), lora_attached(model, adapter):
        hooked = model(input_ids=ids).logits
    plain = model(input_ids=ids).logits
    assert not torch.allclose(hooked, plain, atol=1e-4)  # the hooks were active, and removed after
    save_adapter(adapter, tmp_path / "ad", "tiny")
    loaded, config = load_adapter(tmp_path / "ad")
    assert config["peft_type"] == "LORA" and config["r"] == 2
    merge_adapter(model, loaded)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)


def test_kl_loss_is_zero_for_a_fresh_adapter_and_ce_matches_a_float64_recomputation(tokenizer):
    """B = 0 leaves the model unchanged: the KL rows contribute exactly 0 and the CE rows the model's own loss."""
    from refusal_lens.organism.safety_tune import _batch, reply_loss

    model = random_model("llama", n_layers=2, d_model=32)
    fmt = ChatFormatter(tokenizer)
    examples = build_examples(fmt, HARMFUL[:2], [(HARMLESS[0], [5, 6, 7], "harmless")], seed=0)
    batch = _batch(examples, tokenizer.pad_token_id)
    adapter = init_adapter(model, ("q_proj",), rank=2, seed=0)
    all_kl = reply_loss(model, batch, adapter, torch.tensor([True, True, True]))
    assert float(all_kl.detach()) == pytest.approx(0.0, abs=1e-6)
    mixed = reply_loss(model, batch, adapter, torch.tensor([False, False, True]))
    logits = model.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="none")
    ce[-3:] = 0.0  # the KL row's tokens (last row, right-padded: its tokens come last in row-major order)
    assert float(mixed.detach()) == pytest.approx(float(ce.sum() / keep.sum()), rel=1e-4)
