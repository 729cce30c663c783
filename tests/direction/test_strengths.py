"""Ablation with per-layer strengths (hooks vs edited weights), norm-preserving edits, direction variants."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_lens.core.adapters import FAMILIES as ADAPTED
from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.interventions import ablate_direction
from refusal_lens.direction.strengths import (
    AblationPlan,
    edit_weights,
    edited_weights,
    project_rows,
    weighted_ablation,
)
from refusal_lens.direction.variants import DirectionSet, interpolate, project_off
from refusal_lens.testing import FAMILIES, random_model

PRE_NORM = [f for f in FAMILIES if not ADAPTED[f].post_norms]
PROMPTS = ["how do i bake bread", "hi there friend, write a poem about the sea please", "x"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    return ChatFormatter(tokenizer).encode(PROMPTS)


def _random_plan(model, seed=5) -> AblationPlan:
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    L, d = adapter.n_layers, adapter.d_model
    dirs = torch.randn(L, d, generator=g, dtype=torch.float64)
    # strengths in [0, 1.5) with one exact zero, so "skip this write" is exercised too
    attn = 1.5 * torch.rand(L, generator=g, dtype=torch.float64)
    mlp = 1.5 * torch.rand(L, generator=g, dtype=torch.float64)
    mlp[0] = 0.0
    return AblationPlan(dirs, attn, mlp, torch.randn(d, generator=g, dtype=torch.float64), embed=0.7)


@pytest.mark.parametrize("family", PRE_NORM)
def test_weighted_hooks_and_edited_weights_agree(family, batch):
    model = random_model(family, n_layers=3)
    plan = _random_plan(model)
    plain = model(**batch).logits
    with weighted_ablation(model, plan):
        hooked = model(**batch).logits
    assert (plain - hooked).abs().max() > 1e-3  # the edit does something, so agreement is not vacuous
    with edited_weights(model, plan) as names:
        edited = model(**batch).logits
        assert names
    assert (edited - hooked).abs().max() < 1e-4
    assert torch.equal(model(**batch).logits, plain)  # hooks removed, weights restored
    permanent = copy.deepcopy(model)
    edit_weights(permanent, plan)
    assert (permanent(**batch).logits - hooked).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_uniform_plan_of_strength_one_is_the_papers_ablation(family, batch):
    model = random_model(family, n_layers=2)
    r = torch.randn(get_adapter(model).d_model, generator=torch.Generator().manual_seed(1))
    with ablate_direction(model, r):
        reference = model(**batch).logits
    plan = AblationPlan.uniform(r, 2)
    with weighted_ablation(model, plan):
        assert (model(**batch).logits - reference).abs().max() < 1e-4
    with edited_weights(model, plan):
        assert (model(**batch).logits - reference).abs().max() < 1e-4


def test_norm_preserving_edit_keeps_every_row_norm_in_float64():
    g = torch.Generator().manual_seed(0)
    for shape, axis in (((16, 24), 0), ((24, 16), 1), ((3, 16, 8), 1)):
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        d = shape[axis]
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u /= u.norm()
        out = project_rows(w, u, axis, strength=0.8, norm_preserving=True, chunk_bytes=256)
        assert torch.allclose(out.norm(dim=axis), w.norm(dim=axis), rtol=0, atol=1e-12)
        plain = project_rows(w, u, axis, strength=0.8)
        assert not torch.allclose(plain.norm(dim=axis), w.norm(dim=axis), atol=1e-3)  # plain edit shrinks rows
        full = project_rows(w, u, axis, strength=1.0, norm_preserving=True)
        assert torch.tensordot(full, u, dims=([axis], [0])).abs().max() < 1e-12  # λ=1 still removes u


def test_norm_preserving_model_edit_keeps_row_norms_of_every_writer():
    model = random_model("gpt2", n_layers=2).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = _random_plan(model)
    edited = edit_weights(model, plan, norm_preserving=True)
    writers = {w.name: w for w in get_adapter(model).residual_writers()}
    assert set(edited) <= set(writers) and len(edited) > 4
    for name in edited:
        w = writers[name]
        old, new = before[name], w.param.detach()
        assert not torch.equal(old, new)
        assert torch.allclose(new.norm(dim=w.axis), old.norm(dim=w.axis), rtol=0, atol=1e-10)


def test_interpolation_and_projection_math():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(4, 8, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [3.0], [10.0], [0.5]])
    units = raw / raw.norm(dim=-1, keepdim=True)
    assert torch.allclose(interpolate(raw, 2.0), units[2])
    mid = 0.75 * units[1] + 0.25 * units[2]
    assert torch.allclose(interpolate(raw, 1.25), mid / mid.norm())
    mean = torch.randn(8, generator=g, dtype=torch.float64)
    p = project_off(raw[1], mean)
    assert abs(float(p @ mean)) < 1e-12 and abs(float(p.norm()) - 1) < 1e-12
    # the projected direction is the unit of r̂ minus its component along μ̂ (independent formula)
    mu = mean / mean.norm()
    ref = units[1] - (units[1] @ mu) * mu
    assert torch.allclose(p, ref / ref.norm())


def test_direction_set_matches_hidden_states_in_float64(tokenizer):
    model = random_model("llama", n_layers=3).double()
    fmt = ChatFormatter(tokenizer)
    harmful, harmless = ["how do i steal", "hack a bank now", "x y"], ["bake bread", "a poem"]
    ds = DirectionSet.from_prompts(model, fmt, harmful, harmless, batch_size=2)

    def mean_last(prompts):
        hs = model(**fmt.encode(prompts), output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1].double().mean(0) for h in hs[:-1]])  # resid_pre of each layer

    ref = mean_last(harmful) - mean_last(harmless)
    assert torch.allclose(ds.raw[:3], ref, atol=1e-9)
    dirs, embed_dir = ds.plan_directions(1.5, "per_layer", projected=True)
    assert dirs.shape == (3, 32) and torch.allclose(embed_dir, ds.unit(1.5, True))
    mu = ds.harmless_mean[1:] / ds.harmless_mean[1:].norm(dim=-1, keepdim=True)
    assert (dirs * mu).sum(-1).abs().max() < 1e-9  # each layer's direction is orthogonal to its harmless mean
