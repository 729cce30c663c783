"""Both objectives and their gradients with respect to every per-layer strength, in one pass.

The hook form of an ablation (``x − λ_l (x·u_l) u_l`` on each write) is differentiable in the strengths ``λ``:
with the strengths as leaf tensors, one forward and one backward pass over the search prompts give the refusal
score, the KL and ``∂refusal/∂λ``, ``∂KL/∂λ`` for all ``2L`` strengths (attention and MLP of every layer) at about
three times the cost of scoring the point. Harmful and harmless prompts are separate batches, so each backward pass
feeds exactly one of the two gradients. The model's own parameters are frozen for the pass (no weight gradients
are computed) and restored afterwards. Where the evaluator runs the prompts' shared opening once per point, the pass
does too, and backpropagates into it once per objective (:class:`_Opening`).

The hook form equals the weight edit exactly for pre-norm families (``direction/strengths.py``), so the scores
of the pass are the scores of the point; norm-preserving edits have no hook form, so the search then rescores the
point with the weight edit and uses these gradients only as the direction to move in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..core.hooks import site_hooks
from ..direction.strengths import AblationPlan
from .objectives import Evaluator, Scores
from .points import MAX_STRENGTH, OFF, Point, uniform
from .search import Search, fewest_greedy, greedy_count, greedy_refusal


@dataclass
class Gradients:
    scores: Scores
    refusal_attn: torch.Tensor  # [L] ∂refusal/∂λ_attn (float64)
    refusal_mlp: torch.Tensor
    kl_attn: torch.Tensor  # [L] ∂KL/∂λ_attn
    kl_mlp: torch.Tensor


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block (the strengths are the only leaves)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _scaled_remover(strength: torch.Tensor, u: torch.Tensor):
    def fn(x: torch.Tensor) -> torch.Tensor:
        v = u.to(device=x.device, dtype=x.dtype)
        return x - strength.to(x.dtype) * (x @ v).unsqueeze(-1) * v

    return fn


def strength_gradients(evaluator: Evaluator, plan: AblationPlan) -> Gradients:
    """Scores of ``plan`` (hook form) and the gradients of refusal and KL with respect to its strengths.

    The embedding strength is held fixed (its edit is applied, not differentiated). The pass always runs every
    layer: a layer whose strength is zero still needs its gradient.
    """
    ev = evaluator
    adapter = ev.adapter
    plan.check(adapter)
    attn = plan.attn.clone().double().requires_grad_(True)  # cast to the activations' dtype in each hook
    mlp = plan.mlp.clone().double().requires_grad_(True)
    fns: dict = {}
    for layer in range(adapter.n_layers):
        u = plan.directions[layer]
        fns[(layer, "attn_out")] = _scaled_remover(attn[layer], u)
        fns[(layer, "mlp_out")] = _scaled_remover(mlp[layer], u)
    if plan.embed:
        fns[(0, "resid_pre")] = _scaled_remover(torch.tensor(float(plan.embed)), plan.embed_direction)
    ids = torch.tensor(ev.ids)
    n_harm = sum(b["input_ids"].shape[0] for b in ev.harmful)
    n_safe = sum(b["input_ids"].shape[0] for b in ev.harmless)
    refusal = argmax = kl = 0.0
    grads: dict[str, torch.Tensor] = {}
    with frozen(ev.model), torch.enable_grad(), site_hooks(ev.model, fns, adapter):
        opening = _Opening(ev)
        for b in ev.harmful:
            logits = ev.model(**b, **opening.cache_args(b), logits_to_keep=1).logits
            probs = torch.softmax(logits[:, -1].double(), -1)
            p_ref = probs[:, ids].sum(-1)
            (p_ref.sum() / n_harm).backward()
            refusal += float(p_ref.detach().sum()) / n_harm
            argmax += float(torch.isin(probs.detach().argmax(-1), ids).double().sum()) / n_harm
        opening.backward(retain_graph=True)  # the harmful prompts' share of the gradient through the opening
        grads["refusal_attn"], grads["refusal_mlp"] = _take(attn), _take(mlp)
        row = 0
        for b in ev.harmless:
            logits = ev.model(**b, **opening.cache_args(b), logits_to_keep=1).logits
            logq = torch.log_softmax(logits[:, -1].double(), -1)
            logp = ev.base_logp[row : row + logq.shape[0]]
            row += logq.shape[0]
            per = (logp.exp() * (logp - logq)).sum(-1)
            (per.sum() / n_safe).backward()
            kl += float(per.detach().clamp_min(0).sum()) / n_safe
        opening.backward(retain_graph=False)
        grads["kl_attn"], grads["kl_mlp"] = _take(attn), _take(mlp)
    return Gradients(Scores(refusal, argmax, kl), **grads)


class _Opening:
    """The prompts' shared opening (when the evaluator runs it once per point) in the gradient pass.

    Its keys and values are computed once, under the hooks, with their graph to the strengths; every batch
    continues from detached leaf copies of them, so a batch's backward pass stops at the leaves and adds up
    ``∂objective/∂(keys, values)`` there. :meth:`backward` then carries that sum through the opening's own graph
    once: the chain rule, summed over batches, without running the opening once per batch.
    """

    def __init__(self, ev: Evaluator):
        self.ev, self.kv, self.leaves = ev, [], []
        if ev.prefix is not None:
            self.kv = [t for pair in ev.prefix.keys_values(ev.model, ev.adapter.n_layers, differentiable=True)
                       for t in pair]  # fmt: skip
            self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in self.kv]
        self.pairs = list(zip(self.leaves[0::2], self.leaves[1::2], strict=True))  # (keys, values) per layer

    def cache_args(self, batch: dict) -> dict:
        return self.ev.cache_args(self.pairs, batch)

    def backward(self, retain_graph: bool) -> None:
        pending = [(t, leaf.grad) for t, leaf in zip(self.kv, self.leaves, strict=True) if leaf.grad is not None]
        if pending:
            torch.autograd.backward([t for t, _ in pending], [g for _, g in pending], retain_graph=retain_graph)
        for leaf in self.leaves:
            leaf.grad = None


def _scaled(row: dict[str, Any], bound: float, n_layers: int) -> Point:
    """``row``'s strengths times ``0.9·bound / KL``: its KL moved under ``bound``. KL grows like the square of a
    small edit, but at a front point's strengths on SmolLM2 it fell like strength^1.2–1.3 (a square-root scale
    overshot 0.054 to 0.062 and 0.069), so the scale is linear: a start a little under the bound."""
    point = Point.from_json(row["point"])
    attn, mlp = point.strengths(n_layers)
    return _free(point, torch.cat([attn, mlp]) * (0.9 * bound / max(row["kl"], 1e-12)))


def _free(point: Point, theta: torch.Tensor) -> Point:
    """``point``'s direction with a free strength per layer and write: ``theta`` = attention then MLP strengths,
    clipped to ``[0, 1.5]`` and rounded (the checkpoint key)."""
    values = [round(float(v), 4) for v in theta.clamp(0.0, MAX_STRENGTH)]
    n = len(values) // 2
    return replace(point, attn=OFF, mlp=OFF,
                   attn_w=tuple(values[:n]), mlp_w=tuple(values[n:]))  # fmt: skip


def _take(leaf: torch.Tensor) -> torch.Tensor:
    g = torch.zeros(leaf.shape, dtype=torch.float64) if leaf.grad is None else leaf.grad.double().clone()
    leaf.grad = None
    return g


class GradientSearch(Search):
    """The front traced with gradients: a direction scan, the candidates' uniform strengths at the user's bound
    (:meth:`_choose`: the direction traced), then for each KL bound
    (the user's first, with the most steps; then ``near_bounds`` of it and the ``front_bounds`` nearest of
    ``kl_bounds``) a few steps that lower refusal along the bound with a free strength per layer and write.

    A step moves the strengths ``θ`` (attention and MLP of every layer, in ``[0, 1.5]``) by
    ``−α·P∇R/‖P∇R‖∞`` (steepest descent of the refusal within the KL level set, ``P`` removing the ``∇KL``
    component) plus a Newton step on ``sqrt(KL)`` back to ``0.9·t`` (KL grows like the square of a small edit,
    so its square root is close to linear). Every step is one
    gradient pass that also scores the point; a step that does not improve (fewest refusals under the bound,
    infeasible points last) halves ``α`` and restarts from the best point; one that does doubles ``α`` (at most
    0.5). With ``--max-refusal`` the roles swap (lowest KL along the refusal bound).
    """

    def __init__(self, *args: Any, gradients: Callable[[Any], Gradients], exact_hooks: bool = True, **kw: Any):
        super().__init__(*args, **kw)
        self.gradients, self.exact_hooks = gradients, exact_hooks
        self.grads: dict[str, Gradients] = {}

    def run(self) -> list[dict[str, Any]]:
        best = self._choose(self._scan())
        if best is not None:
            L = self.L
            if self.cfg.target_refusal is not None:
                self._trace(best, "refusal", self.cfg.target_refusal, self.cfg.target_steps)
            first, shape = self.cfg.target_kl, None
            if first is not None:
                self._trace(best, "kl", first, self.cfg.target_steps)
                shape = self._best_under(best, first)
                if shape is not None:  # then the lowest KL with as few greedy refusals as the bound allowed
                    self._trace(best, "refusal_argmax", greedy_count(shape) + 1e-9, self.cfg.settle_steps)
                    shape = self._best_under(best, first)
            # just under the user's bound (where heretic's picks sat on SmolLM2), then the fixed bounds nearest it:
            # a budget that runs out leaves the front traced around the pick
            near = [f * first for f in self.cfg.near_bounds] if first is not None else []
            bounds = sorted(self.cfg.kl_bounds, key=lambda b: abs(math.log(b / (first or 0.1))))
            bounds = [b for b in bounds if all(abs(b - t) > 0.2 * t for t in [first or 0.0, *near] if t > 0)]
            for bound in near + bounds[: self.cfg.front_bounds]:
                # a lower bound starts from the user's bound's best strengths scaled down: on SmolLM2 that shape
                # keeps removing refusal where uniform strengths do not (3 of 39 greedy refusals at KL 0.062 against
                # 8 at 0.056 after three steps from uniform strengths)
                start = _scaled(shape, bound, L) if shape is not None and bound < shape["kl"] else None
                self._trace(best, "kl", bound, self.cfg.gradient_steps, start)
        self.bar.close()
        return list(self.checkpoint.rows.values())

    def _scan(self) -> list[dict[str, Any]]:
        """Full ablation (strength 1 everywhere) with directions spread over depth, then the best one's neighbours,
        its projected form and the per-layer directions (plain and projected)."""
        L = self.L
        n = max(1, min(L - 1, self.cfg.scan_indices))
        indices = sorted({round(1 + i * (L - 2) / max(n - 1, 1)) for i in range(n)}) if L > 2 else [1]
        rows = self._all([self._uniform(Point(float(i)), 1.0) for i in indices], "direction")
        if not rows:
            return []
        top = Point.from_json(min(rows, key=lambda r: (greedy_refusal(r), r["kl"]))["point"])
        half = (indices[1] - indices[0]) // 2 if len(indices) > 1 else 0
        more = [replace(top, index=min(max(top.index + s * half, 1.0), L - 1.0)) for s in (-1, 1) if half]
        more += [replace(top, projected=True)]
        more += [self._uniform(Point(float(L // 2), "per_layer", projected), 1.0) for projected in (False, True)]
        return rows + self._all(more, "direction")

    def _choose(self, rows: list[dict[str, Any]]) -> Point | None:
        """The direction the front is traced in, with its first points (phase "line").

        Of the directions whose full ablation removes refusal (nearly as well as the best), the gentlest: the
        front is traced by scaling it down, and a direction that costs less KL at full strength costs less at
        most strengths (on SmolLM2 the deepest removing directions cost a quarter of the KL of the first). With
        a KL bound ``t`` that one and the next gentlest ones that leave at most half the prompts refusing are
        each scored at the uniform strength that should cost ``t`` (KL rose like strength^1.3 there). Another
        direction replaces the gentlest only if it leaves fewer greedy refusals there by at least
        ``probe_margin``: full ablation misjudges a direction that the bound needs only part of, but a few
        prompts' difference is within the noise of a few dozen search prompts. On SmolLM2 without a system
        prompt the per-layer projected directions left 12 of 39 greedy refusals at full strength, against none
        for the gentlest (global index 25), and 16 against 27 at the bound: traced, they reached 4 of 39 at
        search KL 0.082 against 0.096. With "You are a helpful assistant." they led by 1 against 4 at the bound,
        within the margin; followed anyway, they scored worse on held-out prompts (docs/abliteration.md).
        The gentlest is also scored at strengths 0.25, 0.5 and 0.75 (its line), and alone without a KL bound."""
        if not rows:
            return None
        least = min(greedy_refusal(r) for r in rows)
        removing = [r for r in rows if greedy_refusal(r) <= 2 * least + 0.05]
        gentlest = min(removing, key=lambda r: (r["kl"], greedy_refusal(r)))
        best, t = Point.from_json(gentlest["point"]), self.cfg.target_kl
        # its line first: the points its trace starts from when it is kept (a start under the bound; the probe's
        # strength may land just over it, and a trace from there settled at KL 0.090 instead of 0.077 on SmolLM2)
        self._all([self._uniform(best, s) for s in (0.25, 0.5, 0.75)], "line")
        if t is None:
            return best
        others = sorted((r for r in rows if r is not gentlest and greedy_refusal(r) <= 0.5), key=lambda r: r["kl"])
        probes = []
        for r in [gentlest, *others[: self.cfg.probe_directions - 1]]:
            strength = min(1.0, (t / max(r["kl"], 1e-12)) ** (1 / 1.3))
            probes += self._all([self._uniform(Point.from_json(r["point"]), strength)], "line")
        if not probes:
            return best
        fits = [r for r in probes if r["kl"] <= 1.5 * t] or [min(probes, key=lambda r: r["kl"])]
        winner = min(fits, key=lambda r: (greedy_refusal(r), r["kl"]))
        own = [r for r in fits if Point.from_json(r["point"]).same_direction(best)]
        if own and greedy_refusal(own[0]) - greedy_refusal(winner) < self.cfg.probe_margin:
            return best
        return Point.from_json(winner["point"])

    def _uniform(self, point: Point, strength: float) -> Point:
        return uniform(point, strength, self.L)

    def _gradient_point(self, point: Point, phase: str) -> tuple[dict[str, Any] | None, Gradients | None]:
        key = point.key()
        row = self.checkpoint.rows.get(key)
        if key in self.grads:
            return row, self.grads[key]
        if row is None and len(self.checkpoint.rows) >= self.cfg.max_evaluations:
            return None, None
        plan = point.plan(self.directions)
        g = self.gradients(plan)
        if row is None:  # a resumed run recomputes the gradient but keeps the checkpointed scores
            row = self.record(point, phase, g.scores if self.exact_hooks else self.evaluate(plan))
        elif key not in self.visited:
            self.visited.add(key)
            self.order.append(row)
        self.grads[key] = g
        return row, g

    def _best_under(self, base: Point, bound: float) -> dict[str, Any] | None:
        """This run's fewest greedy refusals with KL at most ``bound`` (then the lowest KL), in ``base``'s direction."""
        under = [r for r in self.order if r["kl"] <= bound and Point.from_json(r["point"]).same_direction(base)]
        return fewest_greedy(under)

    def _trace(self, base: Point, bounded: str, bound: float, steps: int, start: Point | None = None) -> None:
        def value(r: dict[str, Any], name: str) -> float:
            if name == "refusal_argmax":  # a bound on the greedy count alone (the mean probability may move)
                return greedy_count(r)
            return greedy_refusal(r) if name == "refusal" else r[name]

        other = "refusal" if bounded == "kl" else "kl"

        def badness(r: dict[str, Any]) -> float:  # feasible points by the other objective; infeasible ones last
            return value(r, other) if value(r, bounded) <= bound else 10.0 + value(r, bounded) / max(bound, 1e-9)

        # start from the points this run has visited so far (not every checkpointed one): a resumed run then
        # retraces the interrupted run's path and rescores nothing
        rows = [r for r in self.order if Point.from_json(r["point"]).same_direction(base)]
        if not rows:
            return
        name = f"gradient:{bounded}<={bound:g}"
        current = min(rows, key=badness)
        if start is not None and steps > 0:  # a suggested start costs one of the steps; the trace leaves from it
            row, _ = self._gradient_point(start, name)  # even a little over the bound: the first step returns
            current, steps = row if row is not None else current, steps - 1
        alpha = self.cfg.step
        for _ in range(steps):
            point = Point.from_json(current["point"])
            row, g = self._gradient_point(point, name)
            if g is None:
                return
            attn, mlp = point.strengths(self.L)
            theta = torch.cat([attn, mlp])
            g_kl, g_ref = torch.cat([g.kl_attn, g.kl_mlp]), torch.cat([g.refusal_attn, g.refusal_mlp])
            g_bounded, g_other = (g_kl, g_ref) if bounded == "kl" else (g_ref, g_kl)
            norm2 = float(g_bounded @ g_bounded)
            tangent = g_other - (float(g_other @ g_bounded) / norm2) * g_bounded if norm2 > 0 else g_other
            move = -alpha * tangent / tangent.abs().max().clamp_min(1e-12)
            # a bound on the greedy count has no smooth measure to return to: those steps stay on the level set
            if norm2 > 0 and bounded != "refusal_argmax":
                now = max(current[bounded], 1e-12)  # the smooth measure: the gradient is of this one
                if bounded == "kl":  # KL grows like the square of a small edit: a Newton step on sqrt(KL)
                    back = (math.sqrt(0.9 * bound) - math.sqrt(now)) * 2 * math.sqrt(now) / norm2 * g_bounded
                else:
                    back = (bound - now) / norm2 * g_bounded
                move = move + back / max(1.0, float(back.abs().max()) / 0.5)  # at most 0.5 per strength
            new, _ = self._gradient_point(_free(point, theta + move), name)
            if new is None:
                return
            if badness(new) < badness(current) - 1e-9:
                current, alpha = new, min(2 * alpha, 0.5)  # a trust region: longer steps while they work
            else:
                alpha /= 2
