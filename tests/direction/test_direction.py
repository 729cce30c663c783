"""Difference-in-means candidates, selection and the direction artifact, against independent references."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.activations import collect_activations, mean_activations
from refusal_lens.direction.compute import Direction, DirectionConfig, compute_direction, resolve_n_val
from refusal_lens.direction.scoring import kl_divergence, refusal_score_from_logits
from refusal_lens.direction.selection import SelectionConfig, fallback_without_induce, select_direction
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS


def _reference_means(model, fmt, prompts, n_pos):
    """float64 means from output_hidden_states, one prompt at a time (no padding at all)."""
    total = None
    for p in prompts:
        enc = fmt.tokenizer(fmt.format(p), add_special_tokens=False, return_tensors="pt")
        hs = model(**enc, output_hidden_states=True).hidden_states  # L+1 entries: resid_pre 0..L-1, final
        n_layers = len(hs) - 1
        acts = torch.stack([hs[layer][0, -n_pos:].double() for layer in range(n_layers)], dim=1)
        total = acts if total is None else total + acts
    return total / len(prompts)


def test_candidates_equal_float64_recomputation_from_hidden_states(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    got_h = mean_activations(llama, fmt, HARMFUL, batch_size=4, progress=False)  # batches with left padding
    got_b = mean_activations(llama, fmt, HARMLESS, batch_size=4, progress=False)
    L = get_adapter(llama).n_layers
    ref = _reference_means(llama, fmt, HARMFUL, fmt.n_eoi) - _reference_means(llama, fmt, HARMLESS, fmt.n_eoi)
    got = (got_h - got_b)[:, :L]
    assert got.dtype == torch.float64 and got.shape == ref.shape == (fmt.n_eoi, L, 32)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert got[:, 0].abs().max() < 1e-6  # layer 0: template tokens are identical embeddings
    assert got[:, 1:].abs().max() > 1e-3


def test_shared_prefix_and_filter_in_one_pass_equal_per_prompt_references(llama, tokenizer):
    # A system prompt makes a long shared prefix, which is run once and continued from its KV cache.
    fmt = ChatFormatter(tokenizer, system="You are a careful assistant who thinks before answering.")
    prompts = HARMFUL + HARMLESS
    first = torch.stack([llama(**fmt.encode([p])).logits[0, -1] for p in prompts])  # one prompt at a time

    def keep(logits: torch.Tensor) -> torch.Tensor:  # a planted filter: the argmax token id is even
        return logits.argmax(-1) % 2 == 0

    got = collect_activations(llama, fmt, prompts, batch_size=3, keep=keep, progress=False)
    want_kept = [i for i, lg in enumerate(first) if int(lg.argmax()) % 2 == 0]
    assert 0 < len(want_kept) < len(prompts)  # the filter really drops some prompts
    assert got.kept == want_kept
    assert torch.allclose(got.logits, first, atol=1e-4)
    L = get_adapter(llama).n_layers
    ref = _reference_means(llama, fmt, [prompts[i] for i in want_kept], fmt.n_eoi)
    assert torch.allclose(got.mean[:, :L], ref, atol=1e-5, rtol=1e-4)


def _naive_scores(model, fmt, candidates, harmful, harmless, ids):
    """The reference sweep: one candidate at a time, written with plain hooks, no batching of candidates."""
    adapter = get_adapter(model)

    def logits(prompts, hooks):
        handles = [h() for h in hooks]
        try:
            out = []
            for p in prompts:
                enc = fmt.tokenizer(fmt.format(p), add_special_tokens=False, return_tensors="pt")
                out.append(model(**enc).logits[0, -1])
            return torch.stack(out)
        finally:
            for h in handles:
                h.remove()

    def ablation_hooks(r):
        u = r / r.norm()
        proj = lambda x: x - (x @ u)[..., None] * u  # noqa: E731
        hooks = []
        for layer in range(adapter.n_layers):
            blk = adapter.layers[layer]
            hooks.append(lambda b=blk: b.register_forward_pre_hook(lambda m, a: (proj(a[0]), *a[1:])))
            for mod in (adapter.attn_write(layer), adapter.mlp_write(layer)):
                hooks.append(lambda m_=mod: m_.register_forward_hook(lambda m, a, o: proj(o)))
        return hooks

    def add_hook(r, layer):
        blk = adapter.layers[layer]
        return [lambda: blk.register_forward_pre_hook(lambda m, a: (a[0] + r, *a[1:]))]

    base = logits(harmless, [])
    out = {}
    n_pos, L, _ = candidates.shape
    for p in range(n_pos):
        for layer in range(L):
            r = candidates[p, layer].float()
            if r.norm() < 1e-6:
                continue
            bypass = refusal_score_from_logits(logits(harmful, ablation_hooks(r)), ids).mean()
            induce = refusal_score_from_logits(logits(harmless, add_hook(r, layer)), ids).mean()
            kl = kl_divergence(base, logits(harmless, ablation_hooks(r))).mean()
            out[(p - n_pos, layer)] = (float(bypass), float(induce), float(kl))
    return out


def test_selection_matches_naive_reference_and_respects_planted_filters(tokenizer):
    model = random_model("llama", n_layers=5, d_model=32, seed=5)
    fmt = ChatFormatter(tokenizer)
    ids = tokenizer("sorry", add_special_tokens=False)["input_ids"][:1]
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randn(fmt.n_eoi, 5, 32, generator=gen, dtype=torch.float64) * 3
    candidates[:, 0] = 0  # layer 0 is zero, as in real models
    ref = _naive_scores(model, fmt, candidates, HARMFUL[:4], HARMLESS[:4], ids)

    # Plant the filters: the best-bypass candidate is removed by the KL threshold (set just below its KL),
    # and everything at layer >= 3 by the layer filter; the answer is the best bypass among the rest.
    eligible = {k: v for k, v in ref.items() if k[1] < 4}  # max_layer_fraction 0.8 of 5 -> layers 0..3
    best = min(eligible, key=lambda k: eligible[k][0])
    kl_threshold = eligible[best][2] * 0.999
    cfg = SelectionConfig(kl_threshold=kl_threshold, induce_threshold=-1e9, batch_size=5, prune=False)
    result = select_direction(model, fmt, candidates, HARMFUL[:4], HARMLESS[:4], ids, cfg, progress=False)

    expected = min((k for k, v in eligible.items() if v[2] <= kl_threshold), key=lambda k: eligible[k][0])
    assert (result.chosen.position, result.chosen.layer) == expected != best
    for s in result.scores:
        if (s.position, s.layer) in eligible:
            b, i, k = eligible[(s.position, s.layer)]
            assert s.bypass == pytest.approx(b, abs=1e-4) and s.induce == pytest.approx(i, abs=1e-4)
            assert s.kl == pytest.approx(k, abs=1e-5)
    by_key = {(s.position, s.layer): s for s in result.scores}
    assert any("kl >" in r for r in by_key[best].removed_by)
    assert all(any("layer >=" in r for r in by_key[(p, 4)].removed_by) for p in range(-fmt.n_eoi, 0))
    assert all("zero vector" in by_key[(p, 0)].removed_by for p in range(-fmt.n_eoi, 0))

    # pruning skips work but keeps the choice
    pruned = select_direction(
        model,
        fmt,
        candidates,
        HARMFUL[:4],
        HARMLESS[:4],
        ids,
        SelectionConfig(**{**cfg.__dict__, "prune": True}),
        progress=False,
    )
    assert (pruned.chosen.position, pruned.chosen.layer) == expected
    assert sum(s.bypass is not None for s in pruned.scores) < sum(s.bypass is not None for s in result.scores)


def test_selection_explains_when_nothing_survives(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    ids = [5]
    cands = torch.randn(fmt.n_eoi, 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = SelectionConfig(kl_threshold=0.0, induce_threshold=1e9)
    result = select_direction(llama, fmt, cands, HARMFUL[:3], HARMLESS[:3], ids, cfg, progress=False)
    assert result.chosen is None
    assert "no candidate passed" in result.explanation
    assert "kl > 0.0" in result.explanation and "closest candidates" in result.explanation
    assert "--kl-threshold" in result.explanation


def test_fallback_picks_the_best_candidate_failing_only_the_induce_filter(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    cands = torch.randn(fmt.n_eoi, 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = SelectionConfig(kl_threshold=1e9, induce_threshold=1e9, prune=False)
    result = select_direction(llama, fmt, cands, HARMFUL[:3], HARMLESS[:3], [5], cfg, progress=False)
    assert result.chosen is None
    pick = fallback_without_induce(result)
    only_induce = [s for s in result.scores if s.removed_by and all(r.startswith("induce") for r in s.removed_by)]
    assert pick is min(only_induce, key=lambda s: s.bypass) and pick.layer < 3  # layer filter still applies
    cfg_no = SelectionConfig(kl_threshold=0.0, induce_threshold=1e9)
    result = select_direction(llama, fmt, cands, HARMFUL[:3], HARMLESS[:3], [5], cfg_no, progress=False)
    assert fallback_without_induce(result) is None  # KL failures are never rescued
    config = DirectionConfig(filter_data=False, fallback_drop_induce=True, selection=cfg)
    res = compute_direction(
        llama, tokenizer, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], config, refusal_tokens=[5], progress=False
    )
    assert res.direction.meta["selected_by"].startswith("fallback") and "FALLBACK" in res.selection.explanation


def test_compute_direction_and_artifact_round_trip(llama, tokenizer, tmp_path):
    cfg = DirectionConfig(filter_data=False, selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9))
    res = compute_direction(
        llama, tokenizer, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], cfg, refusal_tokens=[5], progress=False
    )
    d = res.direction
    assert d is not None and d.vector.shape == (32,)
    assert torch.equal(d.vector, res.candidates[d.position, d.layer])
    d.save(tmp_path)
    loaded = Direction.load(tmp_path / "direction.safetensors", model=llama)
    assert torch.equal(loaded.vector, d.vector) and torch.equal(loaded.candidates, d.candidates)
    assert (loaded.layer, loaded.position) == (d.layer, d.position)
    assert loaded.meta["model"] and loaded.meta["refusal_lens_version"] and loaded.meta["selection"]["candidates"]

    wide = random_model("llama", n_layers=4, d_model=48)
    with pytest.raises(UserError, match="width 32 but the model's hidden size is 48"):
        Direction.load(tmp_path, model=wide)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        Direction.load(tmp_path / "bad.safetensors")


def test_validation_size_default_is_larger_only_for_tiny_models(llama, tokenizer):
    assert resolve_n_val(DirectionConfig(), llama).n_val == 128  # tiny: extra validation prompts cost seconds
    big = torch.nn.Linear(8000, 7000, device="meta")  # 56M parameters, no memory
    assert resolve_n_val(DirectionConfig(), big).n_val == 32  # the paper's number
    assert resolve_n_val(DirectionConfig(n_val=7), llama).n_val == 7  # an explicit choice is kept
    many = [f"{p} (variant {i})" for i in range(60) for p in HARMFUL[:3]]
    res = compute_direction(llama, tokenizer, many, many, config=DirectionConfig(filter_data=False, n_train=8),
                            refusal_tokens=[5], progress=False)  # fmt: skip
    # carved: min(128, 180 // 5) = 36 per set, and direction.json records the default it resolved to
    assert res.info["config"]["n_val"] == 128 and res.info["counts_sampled"]["harmless_val"] == 36


def test_empty_prompt_lists_are_user_errors(llama, tokenizer):
    with pytest.raises(UserError, match="harmful prompt list is empty"):
        compute_direction(llama, tokenizer, [], HARMLESS)


def test_nan_activations_are_a_user_error(tokenizer):
    model = random_model("llama", n_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        mean_activations(model, ChatFormatter(tokenizer), HARMFUL[:2], progress=False)
