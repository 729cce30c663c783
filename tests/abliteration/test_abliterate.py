"""abliterate: kernels, the front, resume after interruption, the CLI's outputs, and the exports in their clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lens.abliteration.exports import control_vectors, lora_tensors, read_control_vector, save_control_vector
from refusal_lens.abliteration.objectives import Evaluator, Scores
from refusal_lens.abliteration.search import Checkpoint, Kernel, Point, Search, SearchConfig, pareto_front
from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.strengths import AblationPlan, edit_weights, edited_weights
from refusal_lens.direction.variants import DirectionSet
from refusal_lens.testing import FAMILIES, random_model

from ..conftest import HARMFUL, HARMLESS

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_kernel_is_a_linear_tent_with_a_floor():
    k = Kernel(max_weight=1.0, peak=3.0, width=2.0, min_weight=0.5)
    assert k.weights(7).tolist() == [0.0, 0.5, 0.75, 1.0, 0.75, 0.5, 0.0]
    assert Kernel(0.8, 0, 1e9, 0.8).weights(3).tolist() == pytest.approx([0.8] * 3)


def test_pareto_front_keeps_only_undominated_points():
    rows = [
        {"refusal": r, "kl": k, "i": i} for i, (r, k) in enumerate([(0.5, 0.1), (0.4, 0.2), (0.6, 0.3), (0.1, 1.0)])
    ]
    assert [r["i"] for r in pareto_front(rows)] == [0, 1, 3]


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = random_model("llama", n_layers=3)
    fmt = ChatFormatter(tokenizer)
    ds = DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)
    return model, fmt, ds


def test_search_resumes_from_its_checkpoint_without_rescoring(setup, tmp_path):
    model, fmt, ds = setup
    ev = Evaluator(model, fmt, HARMFUL[:3], HARMLESS[:3], [5, 6])
    fresh = Search(ds, ev, Checkpoint(tmp_path / "a.jsonl", {"x": 1}), SearchConfig(max_evaluations=40), False).run()
    assert ev.calls == 40
    # an "interrupted" run: only 15 points got scored before it stopped
    ev2 = Evaluator(model, fmt, HARMFUL[:3], HARMLESS[:3], [5, 6])
    Search(ds, ev2, Checkpoint(tmp_path / "b.jsonl", {"x": 1}), SearchConfig(max_evaluations=15), False).run()
    ev3 = Evaluator(model, fmt, HARMFUL[:3], HARMLESS[:3], [5, 6])
    resumed = Search(ds, ev3, Checkpoint(tmp_path / "b.jsonl", {"x": 1}), SearchConfig(max_evaluations=40), False).run()
    assert ev3.calls == 25  # only the points the first run had not scored
    key = {json.dumps(r["point"], sort_keys=True): (r["refusal"], r["kl"]) for r in fresh}
    assert {json.dumps(r["point"], sort_keys=True): (r["refusal"], r["kl"]) for r in resumed} == key
    with pytest.raises(UserError, match="other inputs"):
        Checkpoint(tmp_path / "b.jsonl", {"x": 2})


def test_evaluator_matches_an_independent_float64_recomputation(setup):
    model, fmt, ds = setup
    plan = Point(1.5, "global", True, Kernel(0.9, 1, 1.5, 0.3), Kernel(0.7, 2, 2, 0.0)).plan(ds)
    ev = Evaluator(model, fmt, HARMFUL[:4], HARMLESS[:4], [5, 6], batch_size=3)
    got = ev(plan)
    m64 = random_model("llama", n_layers=3).double()
    base = m64(**fmt.encode(HARMLESS[:4])).logits[:, -1].log_softmax(-1)
    edit_weights(m64, plan)
    p_harm = m64(**fmt.encode(HARMFUL[:4])).logits[:, -1].softmax(-1)[:, [5, 6]].sum(-1).mean()
    edited = m64(**fmt.encode(HARMLESS[:4])).logits[:, -1].log_softmax(-1)
    kl = (base.exp() * (base - edited)).sum(-1).mean()
    assert got.refusal == pytest.approx(float(p_harm), abs=1e-5)
    assert got.kl == pytest.approx(float(kl), rel=1e-3)  # float32 model vs float64 reference
    assert got.kl > 1e-6  # the plan changes something


def test_lora_export_merged_by_peft_equals_our_edit(setup, tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    from refusal_lens.abliteration.exports import save_lora

    model, fmt, ds = setup
    plan = Point(1.0, "per_layer", False, Kernel(1.0, 1, 1, 0.2), Kernel(0.6, 0, 3, 0.6)).plan(ds)
    batch = fmt.encode(HARMLESS[:3])
    with edited_weights(model, plan):
        ours = model(**batch).logits
    info = save_lora(model, plan, tmp_path / "lora")
    assert info["exact"] and info["max_abs_merge_error"] < 1e-6
    base = random_model("llama", n_layers=3)
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload()
    assert (merged(**batch).logits - ours).abs().max() < 1e-4
    # norm-preserving edits are not rank-1: an SVD approximation whose reported error shrinks with the rank
    errors = [lora_tensors(model, plan, norm_preserving=True, rank=r)[3] for r in (1, 3, 32)]
    assert errors[0] > errors[1] > 1e-4 and errors[2] < 1e-6  # rank 32 = the width: exact


def test_control_vector_round_trips_through_gguf_exactly(setup, tmp_path):
    pytest.importorskip("gguf")
    _, _, ds = setup
    vectors = control_vectors(ds.raw, 2.4)
    assert list(vectors) == [1]  # slot 2 is the output of block 1
    save_control_vector(vectors, tmp_path / "cv.gguf", "tiny", 3)
    back = read_control_vector(tmp_path / "cv.gguf")
    assert set(back) == {1} and torch.equal(back[1], vectors[1])
    assert list(control_vectors(ds.raw, 0.6)) == [1]  # llama.cpp has no block-0 vector: the nearest allowed
    assert torch.equal(control_vectors(ds.raw, 2.0, scale=2.0)[1], (-2 * ds.raw[2]).float())


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys; from refusal_lens.cli.main import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_cli_writes_the_chosen_model_front_and_exports(saved_model, tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps(HARMFUL * 2))
    harmless.write_text(json.dumps(HARMLESS * 2))
    out = tmp_path / "abl"
    args = ["abliterate", "--model", str(saved_model), "--harmful", str(harmful), "--harmless", str(harmless),
            "--out", str(out), "--refusal-tokens", "5,6", "--max-kl", "100", "--max-evaluations", "30",
            "--n-search", "4", "--check-points", "2", "--check-tokens", "3", "--export", "lora,control-vector",
            "--no-progress", "--json"]  # fmt: skip
    res = _cli(args, tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    front = json.loads((out / "front.json").read_text())
    assert len(front["points"]) == summary["evaluations"] and 8 < summary["evaluations"] <= 30
    assert summary["strategy"] == "gradient"  # "auto": 30 points are too few for the coordinate search's grid
    # KL is scored on 4 × --n-search harmless prompts (as many as the list allows), refusal on --n-search
    n_kl = min(16, len(HARMLESS * 2) // 2)
    assert summary["n_prompts"]["harmful_search"] == 4 and summary["n_prompts"]["harmless_search"] == n_kl > 4
    assert all({"refusal", "kl", "point"} <= set(r) for r in front["points"])
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "reproduce.json").read_text())["command"].startswith("refusal-lens abliterate")
    assert (out / "lora" / "adapter_config.json").is_file() and (out / "control_vector.gguf").is_file()
    assert not (tmp_path / ".abl.abliterate.jsonl").exists() and (out / "points.jsonl").is_file()
    # the saved model is the chosen point's edit of the original
    original = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    fmt = ChatFormatter(__import__("transformers").AutoTokenizer.from_pretrained(saved_model))
    directions = DirectionSet.from_prompts(original, fmt, *_train_sets(HARMFUL * 2, HARMLESS * 2))
    plan = Point.from_json(summary["chosen"]["point"]).plan(directions)
    batch = fmt.encode(HARMLESS[:3])
    with edited_weights(original, plan):
        expected = original(**batch).logits
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (saved(**batch).logits - expected).abs().max() < 1e-4
    bad = _cli([*args[:-2], "--export", "onnx"], tmp_path)
    assert bad.returncode == 2 and "onnx" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def _train_sets(harmful, harmless):
    from refusal_lens.abliteration.pipeline import AbliterateConfig, split_prompts

    cfg = AbliterateConfig(n_search=4)  # --n-kl unset: 4 × --n-search harmless prompts score KL
    return (split_prompts(harmful, cfg.n_train, 4, cfg.seed)[0], split_prompts(harmless, cfg.n_train, 16, cfg.seed)[0])


def test_plan_with_every_strength_zero_changes_nothing(setup):
    model, fmt, ds = setup
    zero = AblationPlan(ds.write_units(), torch.zeros(3), torch.zeros(3))
    ev = Evaluator(model, fmt, HARMFUL[:2], HARMLESS[:2], [5])
    assert ev(zero).kl == 0.0


def test_pick_honours_either_bound_and_explains_when_none_fits():
    from refusal_lens.abliteration.pipeline import pick

    front = [{"kl": 0.001, "refusal_generated": 0.8}, {"kl": 0.05, "refusal_generated": 0.3},
             {"kl": 0.5, "refusal_generated": 0.0}]  # fmt: skip
    assert pick(front, max_kl=0.1, max_refusal=None) is front[1]
    assert pick(front, max_kl=None, max_refusal=0.3) is front[1]
    assert pick(front, max_kl=None, max_refusal=0.0) is front[2]
    with pytest.raises(UserError, match="lowest is 0.0010"):
        pick(front, max_kl=1e-4, max_refusal=None)


def test_the_check_includes_the_lowest_kl_point_with_the_fewest_greedy_refusals():
    """Once refusal is gone under the bound, the pick's tie-break is KL: the lowest-KL point with as few greedy
    refusals must be generated for, even when its refusal probability ranks it below the others."""
    from refusal_lens.abliteration.pipeline import _to_check

    def row(argmax: float, mean: float, kl: float) -> dict:
        return {"refusal_argmax": argmax, "refusal": mean, "kl": kl, "point": {"kl": kl}}

    front = [row(0.0, 0.01, 0.095), row(0.0, 0.02, 0.07), row(0.05, 0.03, 0.05), row(0.4, 0.4, 0.01),
             row(0.0, 0.001, 0.3)]  # fmt: skip
    checked = [r["kl"] for r in _to_check(front, 2, max_kl=0.1, max_refusal=None)]
    assert checked[:2] == [0.095, 0.07]  # the most refusal-free point, then the cheapest one as refusal-free


def test_the_check_includes_the_best_points_under_the_near_bounds():
    """Beside the pick, a user wants to know what less KL costs: the fewest greedy refusals with KL <= 0.8 t and
    <= 0.6 t are generated for, not only the spread's ends."""
    from refusal_lens.abliteration.pipeline import _to_check

    def row(argmax: float, kl: float) -> dict:
        return {"refusal_argmax": argmax, "refusal": argmax, "kl": kl, "point": {"kl": kl}}

    front = [row(0.0, 0.095), row(0.05, 0.08), row(0.1, 0.058), row(0.2, 0.04), row(0.5, 0.01), row(0.0, 0.3)]
    checked = sorted(r["kl"] for r in _to_check(front, 4, max_kl=0.1, max_refusal=None, near=(0.6, 0.8)))
    assert checked == [0.01, 0.058, 0.08, 0.095]
    front[1] = row(0.05, 0.085)  # above 0.8 t: the next best under 0.8 t, then the second best under t
    checked = sorted(r["kl"] for r in _to_check(front, 4, max_kl=0.1, max_refusal=None, near=(0.6, 0.8)))
    assert checked == [0.04, 0.058, 0.085, 0.095]


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_starting_at_the_first_edited_layer_gives_the_full_forwards_scores(family, tokenizer):
    model = random_model(family, n_layers=4)
    fmt = ChatFormatter(tokenizer)
    ds = DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)
    cached = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6], batch_size=4)
    full = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6], batch_size=4, cache_bytes=0)
    assert cached.resid is not None and full.resid is None
    late = Point(2.0, "global", False, Kernel(1.0, 3, 1, 0.5), OFF_KERNEL).plan(ds)  # first edit at layer 2
    a, b = cached(late), full(late)
    assert b.kl > 1e-7
    assert a.refusal == pytest.approx(b.refusal, rel=1e-4, abs=1e-9) and a.kl == pytest.approx(b.kl, rel=1e-3)


OFF_KERNEL = Kernel(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_opening_run_once_gives_the_whole_prompts_scores(family, tokenizer):
    """The system message every prompt starts with, run once per point, scores exactly like whole prompts, with
    and without the tail-layers shortcut; a family whose forward cannot take it falls back to whole prompts."""
    model = random_model(family, n_layers=4)
    fmt = ChatFormatter(tokenizer, system="you are a helpful assistant . sure , here is a short story .")
    ds = DirectionSet.from_prompts(model, fmt, HARMFUL, HARMLESS)
    # force: the edit is only compared with itself here, so families where it is not exact are tested too
    shared = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6], batch_size=3, force=True)
    whole = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6], batch_size=3, force=True, shared_prefix=False)
    assert whole.prefix is None
    if family in ("llama", "qwen2", "mistral", "gemma3_text", "qwen2_moe"):  # families the search runs on most
        assert shared.prefix is not None and len(shared.prefix) >= 8
    if shared.prefix is not None:  # the batches hold only what follows the opening
        width = [max(b["input_ids"].shape[1] for b in ev.harmless) for ev in (shared, whole)]
        assert width[0] < width[1]
    for first in (0, 2):  # an edit from layer 0 (whole forwards) and from layer 2 (the tail shortcut, where exact)
        plan = Point(2.0, "global", False, Kernel(1.0, 3, 3 - first, 0.5), Kernel(0.8, 3, 3 - first, 0.2)).plan(ds)
        a, b = shared(plan), whole(plan)
        assert b.kl > 1e-7
        assert a.refusal == pytest.approx(b.refusal, rel=1e-4, abs=1e-8) and a.kl == pytest.approx(b.kl, rel=1e-3)


def _planted_scores(plan: AblationPlan) -> Scores:
    """A known landscape: refusal falls with the strength on layers 3–5, KL grows with every strength (most on
    the early layers), so the front runs from (1, 0) to strong late edits."""
    late = torch.tensor([0.1, 0.1, 0.2, 1.0, 1.0, 0.8, 0.3, 0.1], dtype=torch.float64)
    cost = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.4, 0.4, 0.5, 0.8], dtype=torch.float64)
    w = plan.attn + 0.7 * plan.mlp
    refusal = float(torch.exp(-(late * w).sum()))
    kl = float((cost * (plan.attn**2 + plan.mlp**2)).sum() / 20)
    return Scores(refusal, float(refusal > 0.5), kl)


def test_search_gives_most_of_its_budget_to_the_users_bound_and_traces_the_front_beyond_it(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ds = DirectionSet(torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(9, 16, generator=gen))
    cfg = SearchConfig(max_evaluations=178, target_kl=0.1)  # 160 refined points before the scaled shapes (18)
    rows = Search(ds, _planted_scores, Checkpoint(tmp_path / "a.jsonl", {"x": 1}), cfg, False).run()
    phases = [r["phase"] for r in rows]
    assert len(rows) == 178
    refine = 178 - phases.count("direction") - phases.count("shape") - phases.count("shape@bound")
    assert phases.count("refine:kl<=0.1") == round(0.6 * refine)  # the user's bound: its share, then each larger
    for bound in ("0.2", "0.4", "0.8"):  # bound an equal share of the rest
        assert abs(phases.count(f"refine:kl<={bound}") - 0.4 * refine / 3) <= 1
    front = pareto_front(rows)
    assert any(0.1 < r["kl"] <= 0.2 for r in front) and any(0.4 < r["kl"] <= 0.8 for r in front)
    best = min((r for r in rows if r["kl"] <= 0.1), key=lambda r: r["refusal"])
    assert best["phase"] in ("refine:kl<=0.1", "shape@bound")  # found refining for the bound, or a scaled shape

    # an interruption anywhere (here in the first larger bound's refinement) and a rerun give the same points
    calls = {"n": 0}

    def dies_after_130(plan: AblationPlan) -> Scores:
        calls["n"] += 1
        if calls["n"] > 130:
            raise KeyboardInterrupt
        return _planted_scores(plan)

    with pytest.raises(KeyboardInterrupt):
        Search(ds, dies_after_130, Checkpoint(tmp_path / "b.jsonl", {"x": 1}), cfg, False).run()
    resumed = Search(ds, _planted_scores, Checkpoint(tmp_path / "b.jsonl", {"x": 1}), cfg, False).run()
    assert [r["point"] for r in resumed] == [r["point"] for r in rows]


def test_every_grid_shape_is_scaled_to_the_users_kl_bound_before_the_refinement_starts(tmp_path):
    # the planted KL is exactly quadratic in a common scale of the strengths, so the fitted exponent is 2 and
    # every scaled shape (unless held at the 1.5 ceiling) must land on the bound itself
    gen = torch.Generator().manual_seed(0)
    ds = DirectionSet(torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(9, 16, generator=gen))
    cfg = SearchConfig(max_evaluations=160, target_kl=0.1)
    rows = Search(ds, _planted_scores, Checkpoint(tmp_path / "a.jsonl", {"x": 1}), cfg, False).run()
    grid = [r for r in rows if r["phase"] == "shape"]
    scaled = [r for r in rows if r["phase"] == "shape@bound"]
    assert len(scaled) == len(grid) // 2 == 18  # the grid's two strengths of a shape scale to the same point
    capped = 0
    for r in scaled:
        point = Point.from_json(r["point"])
        if point.attn.max_weight == 1.5:  # the shape is too gentle to reach the bound within the ceiling
            capped += 1
            assert r["kl"] < 0.1
        else:
            assert r["kl"] == pytest.approx(0.1, rel=1e-5)
    assert capped < len(scaled)
    first_refined = next(r for r in rows if r["phase"] == "refine:kl<=0.1")
    start = min((r for r in rows if r["phase"] != "refine:kl<=0.1" and rows.index(r) < rows.index(first_refined)),
                key=lambda r: r["refusal"] + 100 * max(0.0, r["kl"] - 0.1) + 1e-3 * r["kl"])  # fmt: skip
    assert start["phase"] == "shape@bound"  # the refinement starts from a shape compared at the bound


def _one_step_apart(a: dict, b: dict) -> bool:
    """Two points that differ in exactly one kernel parameter or the direction index (a descent's neighbours)."""
    p, q = Point.from_json(a), Point.from_json(b)
    fields = ("max_weight", "peak", "width", "min_weight")
    moved = [getattr(p.attn, f) != getattr(q.attn, f) for f in fields] + [p.index != q.index]
    moved += [getattr(p.mlp, f) != getattr(q.mlp, f) for f in fields]
    return sum(moved) == 1


@pytest.mark.parametrize("starts", [1, 2])
def test_the_users_bound_is_refined_from_as_many_scaled_shapes_as_configured(tmp_path, starts):
    gen = torch.Generator().manual_seed(0)
    ds = DirectionSet(torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(9, 16, generator=gen))
    cfg = SearchConfig(max_evaluations=178, target_kl=0.1, refine_starts=starts)
    rows = Search(ds, _planted_scores, Checkpoint(tmp_path / "a.jsonl", {"x": 1}), cfg, False).run()
    objective = lambda r: r["refusal"] + 100 * max(0.0, r["kl"] - 0.1) + 1e-3 * r["kl"]  # noqa: E731
    first, second = sorted((r for r in rows if r["phase"] == "shape@bound"), key=objective)[:2]
    refined = [r for r in rows if r["phase"] == "refine:kl<=0.1"]
    assert any(_one_step_apart(r["point"], first["point"]) for r in refined)
    # the second-best scaled shape's neighbours are scored only when the descent also starts there
    assert any(_one_step_apart(r["point"], second["point"]) for r in refined) == (starts == 2)


def test_a_forward_that_cannot_continue_the_opening_falls_back_to_whole_prompts(setup, tokenizer, monkeypatch):
    model, _, ds = setup
    fmt = ChatFormatter(tokenizer, system="you are a helpful assistant . sure , here is a short story .")
    whole = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6], shared_prefix=False)

    def broken(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr("refusal_lens.abliteration.prefix.SharedPrefix.cache", broken)
    with pytest.warns(UserWarning, match="scoring whole prompts"):
        fallback = Evaluator(model, fmt, HARMFUL, HARMLESS, [5, 6])
    assert fallback.prefix is None
    plan = Point(1.0, "global", False, Kernel(1.0, 1, 2, 0.5), Kernel(0.5, 1, 2, 0.5)).plan(ds)
    a, b = fallback(plan), whole(plan)
    assert (a.refusal, a.kl) == (b.refusal, b.kl)


def test_auto_strategy_uses_the_coordinate_search_only_where_its_grid_leaves_half_the_budget():
    from refusal_lens.abliteration.pipeline import resolve_strategy

    assert resolve_strategy("auto", 8, 150) == "coordinate"  # the organism: 52 of 150 points before refining
    assert resolve_strategy("auto", 30, 150) == "gradient"  # SmolLM2: 96 of 150
    assert resolve_strategy("auto", 30, 192) == "coordinate"  # 96 = half of 192
    assert resolve_strategy("coordinate", 30, 10) == "coordinate"  # an explicit choice is kept
    with pytest.raises(UserError, match="auto, coordinate, gradient"):
        resolve_strategy("random", 8, 150)
