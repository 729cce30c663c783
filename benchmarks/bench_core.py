"""Benchmarks of the refusal-direction paths: capture overhead, selection, generation under ablation."""

from __future__ import annotations

import statistics

import torch

from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.activations import mean_activations
from refusal_lens.direction.interventions import ablate_direction, add_direction
from refusal_lens.direction.scoring import kl_divergence, last_logits, refusal_score_from_logits
from refusal_lens.direction.selection import SelectionConfig, fallback_without_induce, select_direction
from refusal_lens.testing import random_model

from .common import Result, interleaved_ratio, organism_or_random

WORDS = "how do i write a short story about the sea and plants growing in a garden at home with friends".split()


def _prompts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) for _ in range(n)]


def capture_overhead(quick: bool) -> Result:
    """Forward with capture hooks on every layer vs a plain forward of the same batches (throughput ratio)."""
    model = random_model("llama", n_layers=8, d_model=256, n_heads=8, vocab=300)
    from refusal_lens.testing import toy_tokenizer

    fmt = ChatFormatter(toy_tokenizer())
    prompts = _prompts(64 if quick else 256, 0)

    @torch.no_grad()
    def plain():  # what a user would run without capture: tokenize and forward the same batches
        for b in fmt.batches(prompts, 32):
            model(**b, use_cache=False)

    def ours():
        mean_activations(model, fmt, prompts, batch_size=32, progress=False)

    ratios, details = interleaved_ratio(plain, ours, 3 if quick else 7)
    # ratio = t_plain / t_capture = capture throughput relative to a plain forward
    return Result("capture_overhead", statistics.median(ratios), 0.95, ratios, details)


def reference_sweep(model, fmt, candidates, harmful, harmless, ids, cfg: SelectionConfig, bs: int, scores=None):
    """The naive sweep of the paper's code: every candidate separately, 3 passes each, filters afterwards.

    Returns the chosen ``(position, layer)``; ``scores`` (a dict) receives ``(bypass, induce, kl)`` per candidate.
    """
    n_pos, n_layers, _ = candidates.shape
    base = last_logits(model, fmt, harmless, bs)
    best, best_key = None, None
    for p in range(n_pos):
        for layer in range(n_layers):
            r = candidates[p, layer].float()
            if r.norm() < 1e-6:
                continue
            with ablate_direction(model, r):
                bypass = refusal_score_from_logits(last_logits(model, fmt, harmful, bs), ids).mean()
                kl = kl_divergence(base, last_logits(model, fmt, harmless, bs)).mean()
            with add_direction(model, r, layer):
                induce = refusal_score_from_logits(last_logits(model, fmt, harmless, bs), ids).mean()
            if scores is not None:
                scores[(p - n_pos, layer)] = (float(bypass), float(induce), float(kl))
            if layer >= int(cfg.max_layer_fraction * n_layers) or kl > cfg.kl_threshold:
                continue
            if induce < cfg.induce_threshold:
                continue
            if best is None or bypass < best:
                best, best_key = float(bypass), (p - n_pos, layer)
    return best_key


def _reference_choice(ref: dict, cfg: SelectionConfig, n_layers: int):
    """The reference's choice from its scores, with the fallback our pipeline offers when nothing passes."""
    ok_kl = {k: v for k, v in ref.items() if k[1] < int(cfg.max_layer_fraction * n_layers) and v[2] <= cfg.kl_threshold}
    kept = {k: v for k, v in ok_kl.items() if v[1] >= cfg.induce_threshold}
    pool = kept or ok_kl  # fallback_without_induce: the best bypass failing only the induce filter
    return min(pool, key=lambda k: pool[k][0]) if pool else None


def _compare_scores(ref: dict, res, tol: float = 1e-4) -> int:
    """Assert every score ours computed equals the reference's (KL lower bounds: below the true KL)."""
    compared = 0
    for s in res.scores:
        if (s.position, s.layer) not in ref:
            continue
        b, i, k = ref[(s.position, s.layer)]
        for name, ours, theirs in (("bypass", s.bypass, b), ("induce", s.induce, i), ("kl", s.kl, k)):
            if ours is None:
                continue
            if name == "kl" and s.kl_lower_bound:
                assert ours <= theirs + tol and theirs > res.config.kl_threshold, (s, theirs)
            else:
                assert abs(ours - theirs) <= tol * max(1.0, abs(theirs)), (name, s, theirs)
            compared += 1
    return compared


def selection_speedup(quick: bool) -> Result:
    """Our selection vs the naive reference sweep, same candidates and prompts.

    Asserts the same choice (and the same fallback candidate when nothing passes) and equal scores for
    every score both computed.
    """
    model, tok, which = organism_or_random(quick)
    fmt = ChatFormatter(tok)
    if which == "organism":
        from refusal_lens.organism.corpus import load_split

        harmful = [r["instruction"] for r in load_split("harmful", "val")][:32]
        harmless = [r["instruction"] for r in load_split("harmless", "val")][:32]
        h_train = [r["instruction"] for r in load_split("harmful", "train")][:64]
        b_train = [r["instruction"] for r in load_split("harmless", "train")][:64]
        ids = tok.convert_tokens_to_ids(["I"]) if "I" in tok.get_vocab() else [5]
        cfg = SelectionConfig()
    else:
        harmful, harmless, h_train, b_train = _prompts(32, 1), _prompts(32, 2), _prompts(64, 3), _prompts(64, 4)
        ids = [5]
        cfg = SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9)
    if quick:
        harmful, harmless = harmful[:16], harmless[:16]
    mean_harmful = mean_activations(model, fmt, h_train, progress=False)
    cands = (mean_harmful - mean_activations(model, fmt, b_train, progress=False))[:, :-1]
    chosen, ref_scores, out = {}, {}, {}

    def ref():
        chosen["ref"] = reference_sweep(model, fmt, cands, harmful, harmless, ids, cfg, 32, ref_scores)

    def ours():
        res = out["res"] = select_direction(model, fmt, cands, harmful, harmless, ids, cfg, progress=False)
        pick = res.chosen or fallback_without_induce(res)
        chosen["ours"] = None if res.chosen is None else (res.chosen.position, res.chosen.layer)
        chosen["ours_with_fallback"] = None if pick is None else (pick.position, pick.layer)

    ratios, details = interleaved_ratio(ref, ours, 1 if quick else 3)
    res = out["res"]
    assert chosen["ref"] == chosen["ours"], f"selection differs from the reference: {chosen}"
    fallback_ref = _reference_choice(ref_scores, cfg, cands.shape[1])
    assert fallback_ref == chosen["ours_with_fallback"], f"fallback differs: {fallback_ref} vs {chosen}"
    compared = _compare_scores(ref_scores, res)
    details.update(
        model=which,
        chosen=chosen["ours"],
        chosen_with_fallback=chosen["ours_with_fallback"],
        n_candidates=int(cands.shape[0] * cands.shape[1]),
        scores_compared=compared,
        ours_phase_s={k: round(v, 3) for k, v in res.timings.items()},
        ours_stats=res.stats,
    )
    return Result("selection_speedup", statistics.median(ratios), 3.0, ratios, details)


def generation_overhead(quick: bool) -> Result:
    """Greedy generation with ablation hooks on every layer vs without hooks."""
    model, tok, which = organism_or_random(quick)
    fmt = ChatFormatter(tok)
    batch = fmt.encode(_prompts(16, 5))
    inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    new = 32 if quick else 64

    @torch.no_grad()
    def plain():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)

    @torch.no_grad()
    def hooked():
        with ablate_direction(model, r):
            plain()

    ratios, details = interleaved_ratio(plain, hooked, 2 if quick else 5)
    details["model"] = which
    return Result("generation_overhead", statistics.median(ratios), 0.9, ratios, details)


def abliterate_shared_prefix(quick: bool) -> Result:
    """One abliteration search point scored with the prompts' shared opening (template + system message) run
    once per point vs every prompt run whole (throughput ratio; both must give the same scores)."""
    from refusal_lens.abliteration.objectives import Evaluator
    from refusal_lens.abliteration.search import Kernel, Point
    from refusal_lens.direction.variants import DirectionSet

    model, tok, name = organism_or_random(quick)
    fmt = ChatFormatter(tok, system="You are a helpful assistant.")
    harmful, harmless = _prompts(40, 1), _prompts(100 if quick else 300, 2)
    ds = DirectionSet.from_prompts(model, fmt, harmful, harmless)
    ids = [tok.convert_tokens_to_ids("I")] if hasattr(tok, "convert_tokens_to_ids") else [5]
    shared = Evaluator(model, fmt, harmful, harmless, ids)
    whole = Evaluator(model, fmt, harmful, harmless, ids, shared_prefix=False)
    L = ds.n_layers
    plan = Point(L / 2, "global", False, Kernel(1.0, L / 2, L / 2, 0.2), Kernel(0.8, L / 2, L / 2, 0.0)).plan(ds)
    a, b = shared(plan), whole(plan)
    ratios, details = interleaved_ratio(lambda: whole(plan), lambda: shared(plan), 3 if quick else 7)
    details |= {"model": name, "prefix_tokens": len(shared.prefix) if shared.prefix else 0}
    details |= {"kl_shared": a.kl, "kl_whole": b.kl, "refusal_shared": a.refusal, "refusal_whole": b.refusal}
    return Result("abliterate_shared_prefix", statistics.median(ratios), 1.15, ratios, details)


def abliterate_gradient_shared_prefix(quick: bool) -> Result:
    """One gradient pass of the gradient search (both objectives and their strength gradients) with the shared
    opening run once and backpropagated once vs every prompt whole (throughput ratio; same scores and gradients)."""
    from refusal_lens.abliteration.gradient import strength_gradients
    from refusal_lens.abliteration.objectives import Evaluator
    from refusal_lens.direction.strengths import AblationPlan
    from refusal_lens.direction.variants import DirectionSet

    model, tok, name = organism_or_random(quick)
    fmt = ChatFormatter(tok, system="You are a helpful assistant.")
    harmful, harmless = _prompts(40, 1), _prompts(100, 2)
    ds = DirectionSet.from_prompts(model, fmt, harmful, harmless)
    ids = [tok.convert_tokens_to_ids("I")] if hasattr(tok, "convert_tokens_to_ids") else [5]
    shared = Evaluator(model, fmt, harmful, harmless, ids, tail_cache=False)
    whole = Evaluator(model, fmt, harmful, harmless, ids, shared_prefix=False, tail_cache=False)
    L = ds.n_layers
    dirs, embed_dir = ds.plan_directions(L / 2, "global", False)
    plan = AblationPlan(dirs, torch.linspace(0.2, 0.9, L), torch.linspace(0.8, 0.1, L), embed_dir, 0.0)
    a, b = strength_gradients(shared, plan), strength_gradients(whole, plan)
    ratios, details = interleaved_ratio(
        lambda: strength_gradients(whole, plan), lambda: strength_gradients(shared, plan), 3 if quick else 5
    )
    gap = max(float((getattr(a, k) - getattr(b, k)).abs().max() / getattr(b, k).abs().max().clamp_min(1e-30))
              for k in ("refusal_attn", "refusal_mlp", "kl_attn", "kl_mlp"))  # fmt: skip
    details |= {"model": name, "prefix_tokens": len(shared.prefix) if shared.prefix else 0, "kl_shared": a.scores.kl,
                "kl_whole": b.scores.kl, "max_relative_gradient_difference": gap}  # fmt: skip
    return Result("abliterate_gradient_shared_prefix", statistics.median(ratios), 1.15, ratios, details)
