"""The fast selection path (filters cheapest-rejection first, KL early exit, induce from cached residuals,
a shared template prefix, fallback bypass only for KL survivors) against the exhaustive sweep."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch
import transformers as tf

from refusal_lens.core.adapters import FAMILIES as ADAPTED
from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.hooks import site_hooks
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.interventions import add_direction
from refusal_lens.direction.scoring import kl_divergence, last_logits
from refusal_lens.direction.selection import SelectionConfig, fallback_without_induce, select_direction
from refusal_lens.direction.selection_passes import Passes, PromptSet
from refusal_lens.testing import FAMILIES, random_model

from ..conftest import HARMFUL, HARMLESS
from .test_direction import _naive_scores

N_LAYERS = 5  # max_layer_fraction 0.8 -> layers 0..3 are eligible, layer 0 is zero


def _setup(family: str, tokenizer, seed: int = 0):
    model = random_model(family, n_layers=N_LAYERS, d_model=32, seed=seed)
    with torch.no_grad():  # sharper next-token distributions: scores that differ between candidates
        model.get_output_embeddings().weight.mul_(30)
    fmt = ChatFormatter(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    cands = torch.randn(fmt.n_eoi, N_LAYERS, 32, generator=gen, dtype=torch.float64) * 3
    cands[:, 0] = 0
    ids = tokenizer("sorry", add_special_tokens=False)["input_ids"][:1]
    return model, fmt, cands, ids


def _run(model, fmt, cands, ids, n=6, **cfg):
    config = SelectionConfig(**cfg)
    return select_direction(model, fmt, cands, HARMFUL[:n], HARMLESS[:n], ids, config, progress=False)


def _assert_consistent(fast, full):
    """Same choice and kept set; every score the fast path computed equals the full sweep's."""
    assert [(s.position, s.layer) for s in fast.scores] == [(s.position, s.layer) for s in full.scores]
    key = lambda r: r.chosen and (r.chosen.position, r.chosen.layer)  # noqa: E731
    assert key(fast) == key(full)
    thr = fast.config.kl_threshold
    for a, b in zip(fast.scores, full.scores):
        assert a.kept == b.kept, (a, b)
        for name in ("bypass", "induce"):
            if getattr(a, name) is not None:
                assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-5), (name, a, b)
        if a.kl is None:
            assert b.kl is None
        elif a.kl_lower_bound:
            assert thr < a.kl <= b.kl + 1e-9 and any("early exit" in r for r in a.removed_by)
        else:
            assert a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-9)
    assert fast.baseline_harmful == pytest.approx(full.baseline_harmful, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "gpt_neox", "qwen2_moe"])
def test_fast_path_equals_full_sweep_with_planted_filters(family, tokenizer, monkeypatch):
    model, fmt, cands, ids = _setup(family, tokenizer)
    tail = ADAPTED[family].exact_tail
    # the reference: every candidate scored, induce with full forwards and an addition hook
    monkeypatch.setitem(ADAPTED, family, replace(ADAPTED[family], exact_tail=False))
    loose = _run(model, fmt, cands, ids, kl_threshold=1e9, induce_threshold=-1e9, prune=False, batch_size=8)
    live = [s for s in loose.scores if s.kept]
    # Plant the filters from the exhaustive scores: KL removes about half (some by early exit), induce about
    # half of the rest, so every phase has work and something survives.
    kl_thr = statistics.median(s.kl for s in live)
    induce_thr = statistics.median(s.induce for s in live if s.kl <= kl_thr)
    cfg = dict(kl_threshold=kl_thr, induce_threshold=induce_thr, batch_size=8)
    full = _run(model, fmt, cands, ids, prune=False, **cfg)
    monkeypatch.undo()
    fast = _run(model, fmt, cands, ids, **cfg)
    assert full.chosen is not None and full.stats["induce"] == "full"
    _assert_consistent(fast, full)

    # the expensive paths were really skipped, and each optimisation was exercised
    assert fast.stats["kl_early_exits"] > 0 and any(s.kl_lower_bound for s in fast.scores)
    assert fast.stats["rows"]["kl"] < full.stats["rows"]["kl"]
    assert fast.stats["rows"]["induce"] < full.stats["rows"]["induce"]
    assert fast.stats["rows"]["bypass"] < full.stats["rows"]["bypass"]
    assert sum(s.bypass is not None for s in fast.scores) == sum(s.kept for s in fast.scores)
    assert fast.stats["induce"] == ("tail" if tail else "full")
    assert fast.stats["shared_prefix_tokens"] == {"harmless": 3, "harmful": 3}  # <|bos|><|user|>\n
    n_kept = sum(s.kept for s in fast.scores)
    assert fast.stats["rows"]["kl prefix"] == len(live) and fast.stats["rows"]["bypass prefix"] == n_kept
    assert (fast.stats["tail_forwards"] > 0) == tail
    assert fast.to_json()["stats"] == fast.stats and "kl_lower_bound" in fast.to_json()["candidates"][0]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_full_sweep_equals_naive_reference(family, tokenizer):
    model, fmt, cands, ids = _setup(family, tokenizer, seed=1)
    cands = cands[:, :4]  # layers 0..3: keep the naive sweep short
    ref = _naive_scores(model, fmt, cands, HARMFUL[:4], HARMLESS[:4], ids)
    cfg = SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9, max_layer_fraction=1.0, batch_size=7)
    for prune in (False, True):
        cfg.prune = prune
        res = select_direction(model, fmt, cands, HARMFUL[:4], HARMLESS[:4], ids, cfg, progress=False)
        for s in res.scores:
            if (s.position, s.layer) in ref:
                b, i, k = ref[(s.position, s.layer)]
                assert s.bypass == pytest.approx(b, abs=1e-4) and s.induce == pytest.approx(i, abs=1e-4)
                assert s.kl == pytest.approx(k, abs=1e-5)
        best = min(ref, key=lambda k: ref[k][0])
        assert (res.chosen.position, res.chosen.layer) == best


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nothing_survives_bypass_only_for_kl_survivors_and_same_fallback(family, tokenizer):
    model, fmt, cands, ids = _setup(family, tokenizer, seed=2)
    loose = _run(model, fmt, cands, ids, kl_threshold=1e9, induce_threshold=-1e9, prune=False)
    kl_thr = statistics.median(s.kl for s in loose.scores if s.kept)
    full = _run(model, fmt, cands, ids, kl_threshold=kl_thr, induce_threshold=1e9, prune=False)
    fast = _run(model, fmt, cands, ids, kl_threshold=kl_thr, induce_threshold=1e9)
    assert fast.chosen is None is full.chosen
    _assert_consistent(fast, full)
    scored = {(s.position, s.layer) for s in fast.scores if s.bypass is not None}
    passed_kl = {(s.position, s.layer) for s in full.scores if s.kl is not None and s.kl <= kl_thr}
    assert scored == passed_kl and 0 < len(passed_kl) < sum(s.kl is not None for s in full.scores)
    a, b = fallback_without_induce(fast), fallback_without_induce(full)
    assert (a.position, a.layer) == (b.position, b.layer) and a.bypass == pytest.approx(b.bypass, abs=1e-5)
    assert "closest candidates (lowest bypass)" in fast.explanation


def test_nothing_passes_kl_explains_by_kl_and_scores_no_bypass(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    cands = torch.randn(fmt.n_eoi, 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = select_direction(
        llama, fmt, cands, HARMFUL[:3], HARMLESS[:3], [5], SelectionConfig(kl_threshold=0.0), progress=False
    )
    assert res.chosen is None and "bypass" not in res.stats["forwards"]
    assert all(s.bypass is None and s.induce is None for s in res.scores)
    assert "closest candidates (lowest kl" in res.explanation and "kl >= " in res.explanation
    assert fallback_without_induce(res) is None


def _tail_vs_full(model, fmt, prompts, layer, r):
    """Logits of a tail forward from the captured resid_pre[layer] + r, and of the full model with +r hooked."""
    adapter = get_adapter(model)
    batch = fmt.encode(prompts)
    seen = {}
    with site_hooks(model, {(layer, "resid_pre"): lambda x: seen.setdefault("x", x)}, adapter):
        model(**batch, use_cache=False)
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    with adapter.tail_layers(layer):
        got = model(inputs_embeds=seen["x"] + r, **rest, use_cache=False, logits_to_keep=1).logits[:, -1]
    with add_direction(model, r, layer):
        want = last_logits(model, fmt, prompts)
    return got, want


@pytest.mark.parametrize("family", [f for f in FAMILIES if ADAPTED[f].exact_tail])
def test_tail_forward_equals_full_forward_where_declared_exact(family, tokenizer):
    model = random_model(family, n_layers=3)
    fmt = ChatFormatter(tokenizer)
    adapter = get_adapter(model)
    layers_before = list(model.get_submodule(adapter.spec.layers))
    for layer in (1, 2):
        got, want = _tail_vs_full(model, fmt, HARMLESS[:3], layer, torch.randn(32))
        assert torch.allclose(got, want, atol=1e-5), family
    assert list(model.get_submodule(adapter.spec.layers)) == layers_before


def _sliding_qwen2(window: int = 3):
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(
        vocab_size=300, num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, use_sliding_window=True, sliding_window=window, max_window_layers=2, pad_token_id=0,
    )  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_tail_forward_slices_per_layer_attention_types_and_always_restores(tokenizer):
    model = _sliding_qwen2()
    types = list(model.config.layer_types)
    assert types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    fmt = ChatFormatter(tokenizer)
    for layer in (1, 3):
        got, want = _tail_vs_full(model, fmt, HARMFUL[:3], layer, torch.randn(32))
        assert torch.allclose(got, want, atol=1e-5)
    adapter = get_adapter(model)
    with pytest.raises(RuntimeError, match="boom"), adapter.tail_layers(2):
        assert len(model.model.layers) == 2 and model.config.layer_types == types[2:]
        raise RuntimeError("boom")
    assert list(model.model.layers) == adapter.layers and model.config.layer_types == types


def test_tail_guard_falls_back_to_full_forwards_when_the_decoder_changes_inputs_embeds(tokenizer):
    """A decoder that scales inputs_embeds (as Gemma does in transformers 4.x) is caught at run time."""
    model, fmt, cands, ids = _setup("llama", tokenizer, seed=3)

    def scale(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            return args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] * 2}
        return None

    cfg = dict(kl_threshold=1e9, induce_threshold=-1e9)
    reference = _run(model, fmt, cands, ids, **cfg)
    assert reference.stats["induce"] == "tail"
    handle = model.model.register_forward_pre_hook(scale, with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="does not reproduce"):
            res = _run(model, fmt, cands, ids, **cfg)
    finally:
        handle.remove()
    assert res.stats["induce"] == "full" and res.stats["tail_forwards"] == 0
    _assert_consistent(res, reference)
    assert all(not math.isnan(s.induce) for s in res.scores if s.kept)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2 sliding window 3"])
def test_shared_prefix_cache_equals_whole_prompts(family, tokenizer):
    """The template prefix (here with a system prompt: 25 tokens) run once per direction, then continued."""
    model = _sliding_qwen2() if family.startswith("qwen2 sliding") else random_model(family, n_layers=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    fmt = ChatFormatter(tokenizer, system="you are a helpful assistant")
    prompts = PromptSet(fmt, HARMLESS[:5], torch.device("cpu"))
    passes = Passes(model, batch_size=7)
    base, _ = passes.baseline("baseline", prompts)
    assert torch.allclose(base, last_logits(model, fmt, HARMLESS[:5]), atol=1e-5)
    assert prompts.prefix == 25 and passes.check_prefix(prompts, base)
    gen = torch.Generator().manual_seed(0)
    dirs = {k: torch.randn(32, generator=gen) for k in range(6)}

    def kl_row(idx, logits):
        return kl_divergence(base[idx], logits)

    whole, _ = passes.ablated("kl", prompts, dirs, kl_row)
    shared, _ = passes.ablated("kl", prompts, dirs, kl_row, shared_prefix=True)
    assert passes.rows["kl prefix"] == 6 and max(whole.values()) > 1e-3
    assert all(shared[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-8) for k in dirs)


def test_prefix_guard_falls_back_to_whole_prompts(tokenizer, monkeypatch):
    model, fmt, cands, ids = _setup("llama", tokenizer, seed=4)
    cfg = dict(kl_threshold=1e9, induce_threshold=-1e9)
    reference = _run(model, fmt, cands, ids, **cfg)

    def broken(self, indices):
        raise RuntimeError("no row selection in this cache")

    monkeypatch.setattr(tf.DynamicCache, "batch_select_indices", broken)
    with pytest.warns(UserWarning, match="cached prompt prefix failed .*no row selection"):
        res = _run(model, fmt, cands, ids, **cfg)
    assert res.stats["shared_prefix_tokens"] == {"harmless": 0, "harmful": 0} and "kl prefix" not in res.stats["rows"]
    _assert_consistent(res, reference)
