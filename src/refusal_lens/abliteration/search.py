"""A structured search for the Pareto front of (refusal, KL on harmless prompts).

Two strategies share the points, the checkpoint and the front: :class:`Search` here ("coordinate", the default),
which needs no gradients, and :class:`.gradient.GradientSearch` (a direction scan, then steps along KL bounds from
the gradients of both objectives with respect to every per-layer strength). On held-out prompts the coordinate
search's kernels generalise better (docs/abliteration.md), so it is the default.

Instead of hundreds of blind trials, the coordinate search follows the model's structure, in three phases, each
scored with the cheap first-token objectives (:mod:`.objectives`):

1. **direction**: full ablation (strength 1 everywhere) with each integer direction index, plain and
   projected, global and per-layer: which direction removes refusal at all;
2. **shape**: for the best directions, a small grid of layer kernels (peak, width, strengths 0.6 and 1; attention
   and MLP together, or attention alone): where in depth the edit is needed; with --max-kl, every shape is then
   scaled to cost about that KL, so shapes are compared at the user's bound;
3. **refine**: coordinate descent over every kernel parameter (attention and MLP separately) and the direction
   index, with halving steps: first for the user's bound (fewest refusals with KL ≤ --max-kl, or lowest KL with
   refusal ≤ --max-refusal, as a penalty) with most of the budget, then, with the rest, for larger KL bounds (or
   several refusal + β·KL trade-offs), so the front also has points for a stronger edit.

Every evaluated point is appended to a JSON Lines checkpoint as soon as it is scored; a rerun with the same
inputs reads it back and skips those evaluations, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..core.progress import progress_bar
from ..direction.strengths import AblationPlan
from ..direction.variants import DirectionSet
from .checkpoint import Checkpoint
from .objectives import Scores
from .points import MAX_STRENGTH, OFF, Kernel, Point, scaled, uniform

__all__ = ["OFF", "Checkpoint", "Kernel", "Point", "Search", "SearchConfig", "pareto_front"]


def _under_kl(bound: float) -> Callable[[dict[str, Any]], float]:
    """Objective: fewest refusals with KL at most ``bound`` (a steep penalty beyond; lower KL breaks ties)."""
    return lambda r: r["refusal"] + 100 * max(0.0, r["kl"] - bound) + 1e-3 * r["kl"]


def greedy_count(row: dict[str, Any]) -> float:
    """The fraction of harmful prompts whose most likely first token is a refusal token (older checkpoint rows
    without it: the mean refusal probability)."""
    return row.get("refusal_argmax", row["refusal"])


def fewest_greedy(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the fewest greedy refusals (:func:`greedy_count`), then the lowest KL; ``None`` if empty."""
    return min(rows, key=lambda r: (greedy_count(r), r["kl"]), default=None)


def greedy_refusal(row: dict[str, Any]) -> float:
    """The refusal measure the front is traced and checked with: the fraction of harmful prompts whose most likely
    first token is a refusal token (what greedy generation starts with, so it tracks the generated refusal count),
    plus a small share of the mean refusal probability, which breaks its ties and is what the gradients follow."""
    return greedy_count(row) + 0.05 * row["refusal"]


def pareto_front(rows: list[dict[str, Any]], refusal_key: str = "refusal") -> list[dict[str, Any]]:
    """Rows not dominated in (refusal, kl), sorted by KL (ties: first seen)."""
    value = greedy_refusal if refusal_key == "greedy" else (lambda r: r[refusal_key])
    ordered = sorted(rows, key=lambda r: (r["kl"], value(r)))
    front, best = [], float("inf")
    for r in ordered:
        if value(r) < best - 1e-12:
            front.append(r)
            best = value(r)
    return front


@dataclass
class SearchConfig:
    n_directions: int = 1
    """Directions (from phase 1) whose layer kernels are searched (the refinement still moves the index)."""
    tradeoffs: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0)
    """With --max-refusal: weights β of KL against refusal in the refinement phase (minimise refusal + β·KL for
    each), after the user's bound."""
    front_kl: tuple[float, ...] = (2.0, 4.0, 8.0)
    """With --max-kl: after the user's bound ``t``, the front is traced at the KL bounds ``t × these`` (fewest
    refusals under each), so it has points where a user may want a stronger edit."""
    target_share: float = 0.6
    """Share of the refinement budget (what the direction scan and the shape grid leave) spent on the user's
    bound; the rest is split evenly over the other refinements, so the front is not empty at larger KL."""
    refine_starts: int = 2
    """With --max-kl: the refinement for the user's bound first spends half its budget descending from this many
    of the best grid shapes scaled to the bound (an equal share each), then goes on from the best point found:
    several short descents visit more of the front just under the bound, where the check looks."""
    refine_rounds: int = 3
    """Step halvings in the refinement phase."""
    max_evaluations: int = 150
    """Hard cap on scored points (a resumed run counts the points read back)."""
    target_kl: float | None = None
    """Refine first for the fewest refusals with KL at most this (the user's --max-kl)."""
    target_refusal: float | None = None
    """Refine first for the lowest KL with the first-token refusal at most this (the user's --max-refusal)."""
    scan_indices: int = 8
    """Gradient search: direction indices scored with full ablation (spread over depth; then the best one's
    neighbours, its projected form and the per-layer directions)."""
    probe_directions: int = 3
    """Gradient search, --max-kl t: scanned directions scored at the uniform strength that should cost t (the
    gentlest removing one and the next gentlest); the fewest greedy refusals there is the direction traced, if
    it beats the gentlest one's by ``probe_margin``."""
    probe_margin: float = 0.1
    """Gradient search: the share of harmful prompts by which another direction's greedy refusals at the probe
    must beat the gentlest one's to replace it: 1.5–2 standard errors of the difference of two such shares on
    ~40 prompts when few refuse, so a lead within the noise keeps the gentlest direction."""
    kl_bounds: tuple[float, ...] = (0.01, 0.03, 0.06, 0.2, 0.5, 1.0)
    """Gradient search: after the user's bound, trace the front at these KL bounds (fewest refusals under each)."""
    near_bounds: tuple[float, ...] = (0.6, 0.8)
    """Gradient search, --max-kl t: the bounds t × these are traced right after t (from its best strengths scaled
    down), where a user who wants less KL looks first (heretic's picks sat at 0.6t and 0.8t on SmolLM2)."""
    front_bounds: int = 2
    """Gradient search: how many of ``kl_bounds`` are traced, the nearest to the user's bound first (those within
    20 % of a bound traced before are skipped). Two, not three, since session 10: the third (0.5 for --max-kl 0.1)
    cost 3 steps, ~57 s of an ~870 s run on SmolLM2, far from any bound a user picks."""
    gradient_steps: int = 3
    """Gradient search: steps per bound of ``kl_bounds``."""
    target_steps: int = 8
    """Gradient search: steps along the user's bound (on SmolLM2 the refusal still fell at the sixth)."""
    settle_steps: int = 4
    """Gradient search, --max-kl: then steps that lower KL while keeping the fewest greedy refusals found under the
    bound (once refusal is gone, the rest of the KL budget buys nothing)."""
    step: float = 0.15
    """Gradient search: largest change of any strength along the front per step (halved when a step fails)."""


class Search:
    """Runs the three phases; ``evaluate(plan) -> Scores`` is the (expensive) objective."""

    def __init__(
        self,
        directions: DirectionSet,
        evaluate: Callable[[AblationPlan], Scores],
        checkpoint: Checkpoint,
        config: SearchConfig | None = None,
        progress: bool = True,
        on_point: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.directions, self.evaluate, self.checkpoint = directions, evaluate, checkpoint
        self.cfg = config or SearchConfig()
        self.L = directions.n_layers
        self.bar = progress_bar(total=self.cfg.max_evaluations, desc="abliterate search", disable=not progress)
        self.on_point = on_point
        self.order: list[dict[str, Any]] = []  # rows in the order this run visited them
        self.visited: set[str] = set()  # their points' keys
        self.t0 = time.perf_counter()

    def score(self, point: Point, phase: str) -> dict[str, Any] | None:
        key = point.key()
        row = self.checkpoint.rows.get(key)
        if row is None:
            if len(self.checkpoint.rows) >= self.cfg.max_evaluations:
                return None
            row = self.record(point, phase, self.evaluate(point.plan(self.directions)))
        if key not in self.visited:
            self.visited.add(key)
            self.order.append(row)
        return row

    def record(self, point: Point, phase: str, scores: Scores) -> dict[str, Any]:
        """Checkpoint a freshly scored point."""
        seconds = round(time.perf_counter() - self.t0, 3)  # since this run's search began (benchmarks use it)
        row = {"point": point.to_json(), "phase": phase, **scores.to_json(), "seconds": seconds}
        self.checkpoint.add(row)
        self.bar.update(1)
        self.bar.set_postfix(refusal=f"{row['refusal']:.3f}", kl=f"{row['kl']:.4f}")
        if self.on_point:
            self.on_point(row)
        self.order.append(row)
        self.visited.add(point.key())
        return row

    def _all(self, points: Iterable[Point], phase: str) -> list[dict[str, Any]]:
        return [r for r in (self.score(p, phase) for p in points) if r is not None]

    def run(self) -> list[dict[str, Any]]:
        L = self.L
        scan = [uniform(Point(float(i), "global", pj), 1.0, L) for i in range(1, L) for pj in (False, True)]
        scan += [uniform(Point(float(L // 2), "per_layer", pj), 1.0, L) for pj in (False, True)]
        rows = self._all(scan, "direction")
        best = sorted(rows, key=lambda r: (r["refusal"], r["kl"]))[: self.cfg.n_directions]
        for r in best:
            base = Point.from_json(r["point"])
            shapes = self._all(self._shapes(base), "shape")
            if self.cfg.target_kl is not None:
                self._all(self._at_bound(shapes, self.cfg.target_kl), "shape@bound")
        # (objective, name, its KL bound if it has one)
        refines: list[tuple[Callable[[dict[str, Any]], float], str, float | None]] = []
        if self.cfg.target_refusal is not None:
            t = self.cfg.target_refusal
            refines.append((lambda r: r["kl"] + 100 * max(0.0, r["refusal"] - t) + 1e-3 * r["refusal"],
                            f"refusal<={t:g}", None))  # fmt: skip
        if self.cfg.target_kl is not None:  # the user's bound first: most of the budget goes where the pick is
            bounds = [self.cfg.target_kl * m for m in (1.0, *self.cfg.front_kl)]
            refines += [(_under_kl(b), f"kl<={b:g}", b) for b in bounds]
        else:
            refines += [(lambda r, b=b: r["refusal"] + b * r["kl"], f"beta={b:g}", None) for b in self.cfg.tradeoffs]
        for i, (objective, name, bound) in enumerate(refines):
            # budgets count the points this run visited (read back or new), so a resumed run retraces the same path
            left = self.cfg.max_evaluations - len(self.order)
            share = self.cfg.target_share if i == 0 else 1 / (len(refines) - i)
            end = len(self.order) + max(1, round(share * left))
            if i == 0:  # the user's bound: first short descents from the best shapes scaled to it (if any)
                starts = sorted((r for r in self.order if r["phase"] == "shape@bound"), key=objective)
                each = (end - len(self.order)) // (2 * self.cfg.refine_starts)
                for start in starts[: self.cfg.refine_starts] if self.cfg.refine_starts > 1 else ():
                    self._refine(objective, name, len(self.order) + each, start)
            elif bound is not None:  # a larger bound: first the best point so far scaled up to it
                self._scale_best(objective, name, bound)
            self._refine(objective, name, end)  # then on from the best point found, to the bound's whole share
        self.bar.close()
        return list(self.checkpoint.rows.values())

    def _shapes(self, base: Point) -> list[Point]:
        L = self.L
        out = []
        for peak in (0.25 * (L - 1), 0.5 * (L - 1), 0.75 * (L - 1)):
            for width in (0.25 * L, 0.5 * L, float(L)):
                for strength in (0.6, 1.0):
                    k = Kernel(strength, peak, width, 0.0)
                    out += [replace(base, attn=k, mlp=k), replace(base, attn=k, mlp=OFF)]
        return out

    def _at_bound(self, rows: list[dict[str, Any]], bound: float) -> list[Point]:
        """Every grid shape scaled to cost about ``bound`` in KL, so shapes are compared (and the refinement starts)
        at the user's bound, not at the grid's two strengths. ``KL ∝ s^γ`` from the nearer grid strength: γ fitted
        on the two (clamped to 1..4), or 2 below the weaker, where KL is quadratic in a small edit. Without it the
        organism's search started from a narrow early-layer shape that happened to fall under the bound; mid-depth
        shapes just over it, scaled to it, removed more refusal at equal KL (docs/abliteration.md)."""
        by_shape: dict[str, list[tuple[float, float, Point]]] = {}
        for r in rows:
            p = Point.from_json(r["point"])
            s = p.attn.max_weight
            if s <= 0 or r["kl"] <= 0:
                continue
            unit = scaled(p, 1 / s)
            by_shape.setdefault(unit.key(), []).append((s, r["kl"], unit))
        out = []
        for pairs in by_shape.values():
            (s0, kl0, unit), (s1, kl1, _) = min(pairs, key=lambda t: t[0]), max(pairs, key=lambda t: t[0])
            gamma = math.log(kl1 / kl0) / math.log(s1 / s0) if s1 > s0 and kl1 > kl0 else 2.0
            if bound < kl0:
                scale = s0 * (bound / kl0) ** 0.5
            else:
                scale = s1 * (bound / kl1) ** (1 / min(max(gamma, 1.0), 4.0))
            out.append(scaled(unit, min(scale, MAX_STRENGTH)))
        return out

    def _scale_best(self, objective: Callable[[dict[str, Any]], float], name: str, bound: float) -> None:
        """Score the best point so far with its strengths scaled so its KL (quadratic in a small edit) reaches
        ``bound``: the refinement for a larger bound then starts there, not from a point far under it."""
        best = min(self.order, key=objective, default=None)
        if best is None or best["kl"] <= 0 or best["kl"] >= bound:
            return
        point = Point.from_json(best["point"])
        strongest = max(point.attn.max_weight, point.mlp.max_weight, point.attn.min_weight, point.mlp.min_weight)
        ceiling = MAX_STRENGTH / strongest
        self.score(scaled(point, min((bound / best["kl"]) ** 0.5, ceiling)), f"refine:{name}")

    def _refine(
        self,
        objective: Callable[[dict[str, Any]], float],
        name: str,
        stop_at: int | None = None,
        start: dict[str, Any] | None = None,
    ) -> None:
        """Coordinate descent on ``objective`` from the best point so far, halving the steps each round, until
        ``stop_at`` points are in the checkpoint (points read back from it cost nothing)."""
        # from the rows this run has visited, not every checkpointed one: a resumed run retraces the same path
        if not self.order:
            return
        current = start or min(self.order, key=objective)
        point = Point.from_json(current["point"])
        steps = {"max_weight": 0.2, "peak": 1.0, "width": 1.0, "min_weight": 0.2}
        for _ in range(self.cfg.refine_rounds):
            improved = True
            while improved:
                improved = False
                for candidate in self._neighbours(point, steps):
                    if stop_at is not None and len(self.order) >= stop_at and candidate.key() not in self.visited:
                        return
                    row = self.score(candidate, f"refine:{name}")
                    if row is not None and objective(row) < objective(current) - 1e-9:
                        current, point, improved = row, candidate, True
            steps = {k: v / 2 for k, v in steps.items()}

    def _neighbours(self, point: Point, steps: dict[str, float]) -> list[Point]:
        out = []
        for part in ("attn", "mlp"):
            kernel: Kernel = getattr(point, part)
            for name, step in steps.items():
                for sign in (-1, 1):
                    value = getattr(kernel, name) + sign * step
                    if name in ("max_weight", "min_weight"):
                        value = min(max(value, 0.0), MAX_STRENGTH)
                    elif name == "peak":
                        value = min(max(value, 0.0), self.L - 1.0)
                    else:
                        value = min(max(value, 0.5), float(self.L))
                    moved = replace(kernel, **{name: value})
                    if moved != kernel:
                        out.append(replace(point, **{part: moved}))
        if point.scope == "global":
            for sign in (-1, 1):
                index = min(max(point.index + sign * steps["peak"], 1.0), self.L - 1.0)
                if index != point.index:
                    out.append(replace(point, index=index))
        return out
