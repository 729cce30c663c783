"""The gradient search: strength gradients against finite differences, hook scores against edited weights,
free-strength points in checkpoints, and resume."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.abliteration.gradient import GradientSearch, strength_gradients
from refusal_lens.abliteration.objectives import Evaluator, Scores
from refusal_lens.abliteration.search import Checkpoint, Kernel, Point, SearchConfig
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.strengths import AblationPlan, weighted_ablation
from refusal_lens.direction.variants import DirectionSet
from refusal_lens.testing import FAMILIES, random_model

from ..conftest import HARMFUL, HARMLESS

IDS = [5, 6]


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = random_model("llama", n_layers=3)
    fmt = ChatFormatter(tokenizer)
    return model, fmt, DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)


def _objectives64(model, fmt, plan: AblationPlan) -> tuple[float, float]:
    """Refusal and KL of ``plan`` in float64 through the hook form, written out here independently."""
    harm, safe = fmt.encode(HARMFUL[:4]), fmt.encode(HARMLESS[:4])
    with torch.no_grad():
        base = model(**safe).logits[:, -1].log_softmax(-1)
        with weighted_ablation(model, plan):
            refusal = model(**harm).logits[:, -1].softmax(-1)[:, IDS].sum(-1).mean()
            edited = model(**safe).logits[:, -1].log_softmax(-1)
    return float(refusal), float((base.exp() * (base - edited)).sum(-1).mean())


def test_strength_gradients_match_central_finite_differences(tokenizer):
    model = random_model("llama", n_layers=3).double()
    fmt = ChatFormatter(tokenizer)
    ds = DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)
    dirs, embed_dir = ds.plan_directions(1.4, "global", False)
    attn = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64)
    mlp = torch.tensor([0.6, 0.2, 1.1], dtype=torch.float64)
    ev = Evaluator(model, fmt, HARMFUL[:4], HARMLESS[:4], IDS, batch_size=3)  # two batches each: sums across them
    g = strength_gradients(ev, AblationPlan(dirs, attn, mlp, embed_dir, 0.4))
    ref, kl = _objectives64(model, fmt, AblationPlan(dirs, attn, mlp, embed_dir, 0.4))
    assert g.scores.refusal == pytest.approx(ref, rel=1e-9) and g.scores.kl == pytest.approx(kl, rel=1e-7)
    # a five-point stencil with a wide step: the model's float64 forward still carries ~1e-12 of rounding noise
    # (rotary tables are built in float32), which swamps narrow central differences
    # (abs 2e-9: 3e-5 of the largest component)
    h, stencil = 0.03, ((2, -1 / 12), (1, 8 / 12), (-1, -8 / 12), (-2, 1 / 12))
    for part, grads in (("attn", (g.refusal_attn, g.kl_attn)), ("mlp", (g.refusal_mlp, g.kl_mlp))):
        for layer in range(3):
            fd_ref = fd_kl = 0.0
            for k, weight in stencil:
                a, m = attn.clone(), mlp.clone()
                (a if part == "attn" else m)[layer] += k * h
                r, d = _objectives64(model, fmt, AblationPlan(dirs, a, m, embed_dir, 0.4))
                fd_ref, fd_kl = fd_ref + weight * r / h, fd_kl + weight * d / h
            assert float(grads[0][layer]) == pytest.approx(fd_ref, rel=1e-4, abs=2e-9)
            assert float(grads[1][layer]) == pytest.approx(fd_kl, rel=1e-4, abs=2e-9)
    assert g.kl_attn.abs().max() > 1e-6 and g.refusal_mlp.abs().max() > 1e-6  # gradients that can be wrong


@pytest.mark.parametrize("system", [None, "you are a helpful assistant . sure , here is a short story ."])
def test_gradient_pass_scores_equal_the_edited_weights_scores(setup, tokenizer, system):
    """With a system message both paths run the shared opening once per point (the gradient pass with its graph):
    they must still agree."""
    model, fmt, ds = setup
    fmt = ChatFormatter(tokenizer, system=system)
    point = Point(2.0, "global", False, Kernel(), Kernel(), 0.0, (0.2, 1.3, 0.0), (0.9, 0.0, 0.5))
    ev = Evaluator(model, fmt, HARMFUL[:4], HARMLESS[:4], IDS, batch_size=3)
    assert (ev.prefix is not None) == (system is not None)
    params = list(model.parameters())
    params[0].requires_grad_(True)
    flags = [p.requires_grad for p in params]
    by_hooks = strength_gradients(ev, point.plan(ds)).scores
    assert [p.requires_grad for p in params] == flags and all(p.grad is None for p in params)  # left as found
    params[0].requires_grad_(False)
    by_weights = ev(point.plan(ds))
    assert by_weights.kl > 1e-6
    assert by_hooks.refusal == pytest.approx(by_weights.refusal, abs=1e-6)
    assert by_hooks.kl == pytest.approx(by_weights.kl, rel=1e-4, abs=1e-8)
    assert by_hooks.refusal_argmax == by_weights.refusal_argmax


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_pass_through_the_shared_opening_equals_whole_prompts(family, tokenizer):
    """Running the system message once and backpropagating into it once gives the whole prompts' scores and
    gradients (float64 where the family's kernels allow it, so only the order of additions differs)."""
    grouped_mm = family in ("qwen2_moe", "mixtral", "qwen3_moe")  # torch's grouped matmul takes no float64
    model = random_model(family, n_layers=3) if grouped_mm else random_model(family, n_layers=3).double()
    tol = 1e-4 if grouped_mm else 1e-6
    fmt = ChatFormatter(tokenizer, system="you are a helpful assistant . sure , here is a short story .")
    ds = DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)
    dirs, embed_dir = ds.plan_directions(1.4, "global", False)
    plan = AblationPlan(dirs, torch.tensor([0.3, 0.8, 0.5]), torch.tensor([0.6, 0.2, 1.1]), embed_dir, 0.4)
    shared = Evaluator(model, fmt, HARMFUL[:5], HARMLESS[:5], IDS, batch_size=2, force=True)
    if shared.prefix is None:
        pytest.skip(f"{family}: the evaluator runs whole prompts here (its forward cannot continue the opening)")
    whole = Evaluator(model, fmt, HARMFUL[:5], HARMLESS[:5], IDS, batch_size=2, force=True, shared_prefix=False)
    a, b = strength_gradients(shared, plan), strength_gradients(whole, plan)
    assert a.scores.refusal == pytest.approx(b.scores.refusal, rel=tol)
    assert a.scores.kl == pytest.approx(b.scores.kl, rel=tol) and b.scores.kl > 1e-6
    for name in ("refusal_attn", "refusal_mlp", "kl_attn", "kl_mlp"):
        got, want = getattr(a, name), getattr(b, name)
        assert want.abs().max() > 1e-8, name  # a gradient that can be wrong
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_free_strength_points_round_trip_and_kernel_points_keep_their_keys():
    free = Point(1.5, "global", True, Kernel(0, 0, 0, 0), Kernel(0, 0, 0, 0), 0.0, (0.1, 0.25), (1.0, 0.0))
    assert Point.from_json(json.loads(json.dumps(free.to_json()))) == free
    assert free.strengths(2)[0].tolist() == [0.1, 0.25] and free.strengths(2)[1].tolist() == [1.0, 0.0]
    kernel = Point(2.0, "per_layer", False, Kernel(0.6, 1, 2, 0), Kernel())
    assert "attn_w" not in kernel.to_json() and Point.from_json(kernel.to_json()) == kernel


def test_gradient_search_traces_bounds_and_resumes_without_rescoring(setup, tmp_path):
    model, fmt, ds = setup

    def search(path, budget, recorded):
        ev = Evaluator(model, fmt, HARMFUL[:3], HARMLESS[:3], IDS)
        cfg = SearchConfig(max_evaluations=budget, target_kl=0.05, kl_bounds=(0.5, 4.0), front_bounds=1,
                           gradient_steps=2, target_steps=3, settle_steps=2)  # fmt: skip
        s = GradientSearch(ds, ev, Checkpoint(path, {"x": 1}), cfg, False,
                           on_point=recorded.append, gradients=lambda plan: strength_gradients(ev, plan))  # fmt: skip
        return s.run()

    fresh_new: list = []
    fresh = search(tmp_path / "a.jsonl", 100, fresh_new)
    phases = [r["phase"] for r in fresh]
    assert "gradient:kl<=0.05" in phases and "gradient:kl<=0.5" in phases
    assert "gradient:kl<=4" not in phases  # front_bounds=1: only the bound nearest the user's
    # every step scores one new point: the user's bound gets target_steps, the other bound gradient_steps
    assert phases.count("gradient:kl<=0.05") == 3 and phases.count("gradient:kl<=0.5") == 2
    # and right after the user's bound, 0.6 and 0.8 of it (near_bounds), before the fixed ones
    traced = [p for p in dict.fromkeys(phases) if p.startswith("gradient:kl")]
    assert traced == ["gradient:kl<=0.05", "gradient:kl<=0.03", "gradient:kl<=0.04", "gradient:kl<=0.5"]
    # then the lowest KL keeping the fewest greedy refusals found under the user's bound
    under = [r for r in fresh if r["phase"] in ("gradient:kl<=0.05", "line", "direction") and r["kl"] <= 0.05]
    floor = min(r["refusal_argmax"] for r in under)
    settle = [r for r in fresh if r["phase"].startswith("gradient:refusal_argmax<=")]
    assert len(settle) == 2 and settle[0]["phase"] == f"gradient:refusal_argmax<={floor + 1e-9:g}"
    assert any("attn_w" in r["point"] for r in fresh)
    assert len(fresh_new) == len(fresh)
    first: list = []
    search(tmp_path / "b.jsonl", 9, first)  # "interrupted" after 9 points
    resumed_new: list = []
    resumed = search(tmp_path / "b.jsonl", 100, resumed_new)
    assert len(first) == 9 and len(resumed_new) == len(fresh) - 9  # only the points not scored before
    key = {json.dumps(r["point"], sort_keys=True): (r["refusal"], r["kl"]) for r in fresh}
    assert {json.dumps(r["point"], sort_keys=True): (r["refusal"], r["kl"]) for r in resumed} == key


def test_a_lower_bound_starts_from_the_user_bounds_best_strengths_scaled_down(setup, tmp_path):
    """The trace at a KL bound below the user's starts from the user's bound's best point (fewest greedy refusals,
    then lowest KL) with every strength times 0.9 t / KL, and that start is one of its steps."""
    model, fmt, ds = setup
    ev = Evaluator(model, fmt, HARMFUL[:3], HARMLESS[:3], IDS)
    # (this random model's edits cost little KL: its settled point has KL ~5e-6, so the lower bound is 1e-6)
    cfg = SearchConfig(max_evaluations=100, target_kl=0.05, kl_bounds=(1e-6,), front_bounds=1,
                       gradient_steps=2, target_steps=3, settle_steps=1)  # fmt: skip
    rows = GradientSearch(ds, ev, Checkpoint(tmp_path / "c.jsonl", {"x": 1}), cfg, False,
                          gradients=lambda plan: strength_gradients(ev, plan)).run()  # fmt: skip
    lower = [r for r in rows if r["phase"] == "gradient:kl<=1e-06"]
    before = rows[: rows.index(lower[0])]
    start = Point.from_json(lower[0]["point"])
    under = [r for r in before if r["kl"] <= 0.05 and Point.from_json(r["point"]).same_direction(start)]
    assert under and len(lower) == 2  # the start counts as one of the 2 steps
    shape = min(under, key=lambda r: (r["refusal_argmax"], r["kl"]))
    attn, mlp = Point.from_json(shape["point"]).strengths(3)
    expected = (torch.cat([attn, mlp]) * 0.9e-6 / shape["kl"]).clamp(0, 1.5)
    assert list(start.attn_w + start.mlp_w) == pytest.approx(expected.tolist(), abs=1e-4)
    assert lower[0]["kl"] <= 1e-6  # KL falls at least linearly with the strengths: the start is under the bound


def test_greedy_front_ranks_by_the_argmax_refusal_then_the_probability():
    from refusal_lens.abliteration.search import pareto_front

    values = [(0.70, 0.8, 0.1), (0.60, 0.8, 0.2), (0.75, 0.7, 0.3), (0.5, 0.9, 0.4)]  # mean, argmax, KL
    rows = [{"refusal": m, "refusal_argmax": a, "kl": k, "i": i} for i, (m, a, k) in enumerate(values)]
    assert [r["i"] for r in pareto_front(rows, "greedy")] == [0, 1, 2]  # 3 has the lowest mean but a worse argmax
    assert [r["i"] for r in pareto_front(rows)] == [0, 1, 3]


@pytest.mark.parametrize("floor, switched", [(0.2, True), (0.35, False)])
def test_the_traced_direction_is_the_one_with_fewest_greedy_refusals_at_the_users_kl_bound(tmp_path, floor, switched):
    """A planted answer: the gentlest direction that removes all refusal at full strength (global 2) leaves 41 %
    of the prompts refusing at KL 0.1. The per-layer projected directions leave ``floor`` at full strength and
    about that at the bound (``s`` ≈ 0.49). Each candidate is scored at the uniform strength (t / KL_full)^(1/1.3);
    the per-layer ones replace the gentlest only when they lead by the margin (0.1): 21 % against 41 %, not 36 %."""
    gen = torch.Generator().manual_seed(0)
    ds = DirectionSet(torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randn(5, 8, generator=gen))
    # direction -> (KL at full strength, greedy refusal at uniform strength s); KL = KL_full · s^1.3
    planted = {
        (1.0, "global", False): (0.05, lambda s: 1.0),
        (2.0, "global", False): (0.2, lambda s: max(0.0, 1 - s)),
        (3.0, "global", False): (1.0, lambda s: max(0.0, 1 - s)),
        (2.0, "global", True): (0.6, lambda s: max(0.0, 1 - s)),
        (2.0, "per_layer", False): (0.3, lambda s: 0.9),
        (2.0, "per_layer", True): (0.25, lambda s: floor + (1 - floor) * max(0.0, 1 - 2 * s)),
    }
    units = {key: ds.plan_directions(*key)[0] for key in planted}

    def evaluate(plan: AblationPlan) -> Scores:
        key = next(k for k, u in units.items() if torch.allclose(u, plan.directions))
        s = float(plan.attn.mean())
        kl_full, greedy = planted[key]
        return Scores(greedy(s), greedy(s), kl_full * s**1.3)

    cfg = SearchConfig(target_kl=0.1, scan_indices=3)
    search = GradientSearch(ds, evaluate, Checkpoint(tmp_path / "p.jsonl", {"x": 1}), cfg, False, gradients=None)
    chosen = search._choose(search._scan())
    assert (chosen.index, chosen.scope, chosen.projected) == (
        (2.0, "per_layer", True) if switched else (2.0, "global", False)
    )
    lines = [r for r in search.order if r["phase"] == "line"]
    gentlest = (2.0, "global", False)
    # the gentlest direction's line first (its trace's starting points if it is kept), then one probe each for it
    # and the next two gentlest directions leaving at most half the prompts refusing
    assert [r["point"]["attn"]["max_weight"] for r in lines[:3]] == [0.25, 0.5, 0.75]
    assert all((r["point"]["index"], r["point"]["scope"], r["point"]["projected"]) == gentlest for r in lines[:3])
    probes = {(r["point"]["index"], r["point"]["scope"], r["point"]["projected"]): r for r in lines[3:]}
    assert len(lines) == 6 and set(probes) == {gentlest, (2.0, "per_layer", True), (2.0, "global", True)}
    for key, row in probes.items():
        strength = (0.1 / planted[key][0]) ** (1 / 1.3)
        assert row["point"]["attn"]["max_weight"] == pytest.approx(strength, abs=1e-5)
        assert row["kl"] == pytest.approx(0.1, rel=1e-4)  # each probe costs the bound
    assert probes[(2.0, "per_layer", True)]["refusal_argmax"] < probes[(2.0, "global", False)]["refusal_argmax"]
    # without a KL bound (--max-refusal), the gentlest removing direction, scaled along a line
    plain = GradientSearch(ds, evaluate, Checkpoint(tmp_path / "q.jsonl", {"x": 1}),
                           SearchConfig(target_refusal=0.1, scan_indices=3), False, gradients=None)  # fmt: skip
    point = plain._choose(plain._scan())
    assert (point.index, point.scope, point.projected) == (2.0, "global", False)
    assert [r["point"]["attn"]["max_weight"] for r in plain.order if r["phase"] == "line"] == [0.25, 0.5, 0.75]
