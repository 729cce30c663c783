"""Selecting the refusal direction among the difference-in-means candidates (Arditi et al. 2024, §1).

For every candidate ``r[p, l]`` (post-instruction position ``p``, layer ``l``), on validation prompts:

* ``bypass`` — mean refusal score on harmful prompts with ``r̂`` ablated everywhere (lower is better);
* ``induce`` — mean refusal score on harmless prompts with ``+r`` added at layer ``l`` (all positions);
* ``kl`` — mean KL(baseline ‖ ablated) of the last-position next-token distribution on harmless prompts.

Candidates with NaN scores, ``l ≥ int(max_layer_fraction·L)``, ``kl > kl_threshold`` or
``induce < induce_threshold`` are discarded; the lowest ``bypass`` wins. All thresholds are configurable,
and when nothing survives the result says which filter removed what and lists the closest candidates.

Speed (same choice and, for every score computed, the same value as scoring each candidate separately):
candidates share forward passes with almost no padding, the template's common prefix runs once per
candidate (:mod:`refusal_lens.direction.selection_passes`), the layer filter is applied before anything runs, and
the filters run cheapest-rejection first. With ``prune=True`` (default):

1. ``kl`` for every live candidate, highest-entropy prompts first: a candidate whose partial KL sum
   already proves ``kl > kl_threshold`` is not scored further (its ``kl`` is then a lower bound,
   ``kl_lower_bound``);
2. ``induce`` only for the KL survivors, from the cached baseline residual entering layer ``l`` (only
   layers ``l..L-1`` run) in families where that is exact, full forwards elsewhere;
3. ``bypass`` only for candidates that passed both; when none did, for the KL survivors (the ones
   :func:`fallback_without_induce` may pick and the explanation ranks).

``prune=False`` scores every live candidate on all three (the reference sweep's output, same choice).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.prompts import ChatFormatter
from .scoring import kl_divergence, refusal_score_from_logits
from .selection_passes import Passes, PromptSet
from .uncertainty import bootstrap_selection


@dataclass
class SelectionConfig:
    kl_threshold: float = 0.1
    """Discard candidates whose ablation moves harmless next-token distributions more than this (KL)."""
    max_layer_fraction: float = 0.8
    """Discard candidates at layers ≥ int(fraction × n_layers) (directions too close to the unembedding)."""
    induce_threshold: float = 0.0
    """Discard candidates whose addition leaves the mean harmless refusal score below this."""
    prune: bool = True
    """Skip scores of candidates already removed by another filter (same choice, faster)."""
    batch_size: int = 32
    """Rows per forward pass (prompts × candidates)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the validation prompts for intervals and choice frequencies (0: off; no forwards)."""


@dataclass
class CandidateScore:
    position: int  # negative index from the end of the prompt, e.g. -1 = last template token
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    norm: float = 0.0
    removed_by: list[str] = field(default_factory=list)
    kl_lower_bound: bool = False  # kl is a partial mean (scoring stopped once it proved kl > threshold)

    @property
    def kept(self) -> bool:
        return not self.removed_by


@dataclass
class SelectionResult:
    scores: list[CandidateScore]
    chosen: CandidateScore | None
    baseline_harmful: float
    baseline_harmless: float
    config: SelectionConfig
    explanation: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    """Work done: forward passes and rows per phase, KL early exits, how induce was scored."""
    bootstrap: dict[str, Any] | None = None
    """Intervals and choice frequencies over resampled validation prompts (:mod:`.uncertainty`)."""
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    """Seconds per phase (not written to JSON: it would make artifacts differ run to run)."""

    def to_json(self) -> dict:
        return {
            "chosen": None if self.chosen is None else {"position": self.chosen.position, "layer": self.chosen.layer},
            "baseline_refusal_score": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "filters": asdict(self.config),
            "explanation": self.explanation,
            "candidates": [asdict(s) for s in self.scores],
            "stats": self.stats,
            "bootstrap": self.bootstrap,
        }


def _nan(v: float | None) -> bool:
    return v is not None and math.isnan(v)


def select_direction(
    model: nn.Module,
    formatter: ChatFormatter,
    candidates: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    config: SelectionConfig | None = None,
    progress: bool = True,
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SelectionResult:
    """Score every candidate of ``candidates [n_pos, n_layers, d]`` and choose one (see module doc).

    ``score(logits) -> per-row refusal score`` replaces the paper's log-odds of ``refusal_ids`` (e.g. a
    :class:`~refusal_lens.direction.refusal_fit.RefusalScore` contrast).
    """
    t_start = time.perf_counter()
    cfg = config or SelectionConfig()
    n_pos, n_layers, _ = candidates.shape
    cand = candidates.float()
    passes = Passes(model, cfg.batch_size)

    def refusal_row(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return score(logits) if score is not None else refusal_score_from_logits(logits, refusal_ids)

    scores: dict[tuple[int, int], CandidateScore] = {}
    max_layer = int(cfg.max_layer_fraction * n_layers)
    for p in range(n_pos):
        for layer in range(n_layers):
            s = CandidateScore(position=p - n_pos, layer=layer, norm=float(cand[p, layer].norm()))
            if s.norm < 1e-6:
                s.removed_by.append("zero vector")
            elif layer >= max_layer:
                s.removed_by.append(f"layer >= {max_layer} (max_layer_fraction {cfg.max_layer_fraction})")
            scores[(p, layer)] = s
    live = [k for k, s in scores.items() if s.kept]
    bar = tqdm(total=4, desc="selection", disable=not progress, leave=False)

    harmless = PromptSet(formatter, harmless_val, passes.device)
    harmful = PromptSet(formatter, harmful_val, passes.device)
    tail = passes.adapter.spec.exact_tail
    capture = sorted({k[1] for k in live}) if tail else []
    base_harmless, resid = passes.baseline("baseline", harmless, capture)
    base_harmful, _ = passes.baseline("baseline", harmful)
    bar.update()

    # 1. kl: ablation on harmless prompts, every live candidate; with pruning, stop once kl > threshold is proven.
    def kl_row(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return kl_divergence(base_harmless[idx], logits)

    n_b = len(harmless_val)
    stop = cfg.kl_threshold if cfg.prune else None
    shared_b = passes.check_prefix(harmless, base_harmless)
    # Prompts whose baseline next-token distribution is uncertain move most under ablation: scoring them
    # first lets the early exit happen sooner (the order changes no score, only the work skipped).
    logp = torch.log_softmax(base_harmless.double(), -1)
    uncertain_first = torch.argsort(-(logp.exp() * logp).sum(-1), descending=True, stable=True).tolist()
    sums, counts = passes.ablated(
        "kl", harmless, {k: cand[k] for k in live}, kl_row, stop, shared_b, uncertain_first if stop else None
    )
    for k in live:
        scores[k].kl = sums[k] / n_b
        scores[k].kl_lower_bound = counts[k] < n_b
    kl_ok = [k for k in live if scores[k].kl <= cfg.kl_threshold]  # NaN compares False
    bar.update()

    # 2. induce: addition at the candidate's layer on harmless prompts, for the KL survivors (all if not pruning).
    need = kl_ok if cfg.prune else live
    if need and tail and not passes.check_tail(harmless, resid, base_harmless, max(k[1] for k in need)):
        tail = False
    sums = passes.induced(
        harmless, {k: cand[k] for k in need}, {k: k[1] for k in need}, refusal_row, resid if tail else None
    )
    del resid
    for k in need:
        scores[k].induce = sums[k] / n_b
    for k in live:
        s = scores[k]
        if _nan(s.kl) or _nan(s.induce):
            s.removed_by.append("NaN score")
            continue
        if s.kl > cfg.kl_threshold:
            s.removed_by.append(f"kl > {cfg.kl_threshold}" + (" (early exit)" if s.kl_lower_bound else ""))
        if s.induce is not None and s.induce < cfg.induce_threshold:
            s.removed_by.append(f"induce < {cfg.induce_threshold}")
    bar.update()

    # 3. bypass: ablation on harmful prompts, for the survivors; when none survived, for the KL survivors.
    if not cfg.prune:
        need = live
    else:
        need = [k for k in live if scores[k].kept] or [k for k in kl_ok if "NaN score" not in scores[k].removed_by]
    shared_h = passes.check_prefix(harmful, base_harmful)
    sums, _ = passes.ablated("bypass", harmful, {k: cand[k] for k in need}, refusal_row, shared_prefix=shared_h)
    for k in need:
        s = scores[k]
        s.bypass = sums[k] / len(harmful_val)
        if math.isnan(s.bypass) and "NaN score" not in s.removed_by:
            s.removed_by.append("NaN score")
    bar.update()
    bar.close()

    ordered = [scores[(p, layer)] for p in range(n_pos) for layer in range(n_layers)]
    kept = [s for s in ordered if s.kept]
    chosen = min(kept, key=lambda s: s.bypass) if kept else None
    result = SelectionResult(
        scores=ordered,
        chosen=chosen,
        baseline_harmful=float(refusal_row(None, base_harmful).mean()),
        baseline_harmless=float(refusal_row(None, base_harmless).mean()),
        config=cfg,
        stats={
            "forwards": dict(passes.forwards),
            "rows": dict(passes.rows),
            "kl_early_exits": passes.kl_early_exits,
            "induce": "tail" if tail else "full",
            "tail_forwards": passes.tail_forwards,
            "shared_prefix_tokens": {"harmless": harmless.prefix * shared_b, "harmful": harmful.prefix * shared_h},
        },
        timings={**passes.seconds, "total": time.perf_counter() - t_start},
    )
    if cfg.bootstrap > 0:
        keys = [(p, layer) for p in range(n_pos) for layer in range(n_layers)]
        allowed = [k in live and not any(r in ("NaN score", "zero vector") for r in scores[k].removed_by) for k in keys]
        result.bootstrap = bootstrap_selection(
            keys, passes.per_prompt, len(harmful_val), n_b, allowed, cfg.kl_threshold, cfg.induce_threshold,
            None if chosen is None else (chosen.position + n_pos, chosen.layer), cfg.bootstrap,
            names={k: f"pos {k[0] - n_pos} layer {k[1]}" for k in keys},
        )  # fmt: skip
    result.explanation = explain(result)
    if result.bootstrap is not None:
        result.explanation += "\n" + result.bootstrap["summary"]
    return result


def fallback_without_induce(result: SelectionResult) -> CandidateScore | None:
    """When nothing passed, the lowest-bypass candidate removed *only* by the induce filter (or None).

    Such a candidate still passes the KL and layer filters; it bypasses refusal but adding it alone does
    not push the mean harmless refusal score above the threshold. Callers must say that they used it.
    """
    if result.chosen is not None:
        return None
    only_induce = [
        s for s in result.scores
        if s.removed_by and all(r.startswith("induce <") for r in s.removed_by) and s.bypass is not None
    ]  # fmt: skip
    return min(only_induce, key=lambda s: s.bypass) if only_induce else None


def _scores_text(s: CandidateScore) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "not scored" if v is None else format(v, spec)

    kl = ("kl >= " if s.kl_lower_bound else "kl ") + fmt(s.kl, ".4f")
    return f"bypass {fmt(s.bypass, '.3f')} induce {fmt(s.induce, '.3f')} {kl}"


def explain(result: SelectionResult, top: int = 5) -> str:
    """A human-readable account of the selection: the choice, or why nothing survived."""
    if result.chosen is not None:
        c = result.chosen
        return (
            f"selected position {c.position}, layer {c.layer}: bypass {c.bypass:.3f} "
            f"(baseline {result.baseline_harmful:.3f}), induce {c.induce:.3f}, kl {c.kl:.4f}; "
            f"{sum(s.kept for s in result.scores)} of {len(result.scores)} candidates passed the filters."
        )
    counts: dict[str, int] = {}
    for s in result.scores:
        for reason in s.removed_by:
            counts[reason] = counts.get(reason, 0) + 1
    lines = [f"no candidate passed the filters ({len(result.scores)} candidates). Removed by:"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]

    def finite(v: float | None) -> bool:
        return v is not None and not math.isnan(v)

    closest = sorted((s for s in result.scores if finite(s.bypass)), key=lambda s: s.bypass)[:top]
    if closest:
        lines.append("closest candidates (lowest bypass):")
    else:  # nothing passed the KL filter, so no bypass was scored: rank by KL instead
        closest = sorted((s for s in result.scores if finite(s.kl)), key=lambda s: s.kl)[:top]
        if closest:
            lines.append("closest candidates (lowest kl; '>=' marks a lower bound):")
    lines += [
        f"  pos {s.position} layer {s.layer}: {_scores_text(s)} (removed by {', '.join(s.removed_by)})" for s in closest
    ]
    lines.append(
        "relax a filter (--kl-threshold, --max-layer-fraction, --induce-threshold) or pick one with --layer/--position."
    )
    return "\n".join(lines)
