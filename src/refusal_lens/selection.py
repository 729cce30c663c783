"""Selecting the refusal direction among the difference-in-means candidates (Arditi et al. 2024, §1).

For every candidate ``r[p, l]`` (post-instruction position ``p``, layer ``l``), on validation prompts:

* ``bypass`` — mean refusal score on harmful prompts with ``r̂`` ablated everywhere (lower is better);
* ``induce`` — mean refusal score on harmless prompts with ``+r`` added at layer ``l`` (all positions);
* ``kl`` — mean KL(baseline ‖ ablated) of the last-position next-token distribution on harmless prompts.

Candidates with NaN scores, ``l ≥ int(max_layer_fraction·L)``, ``kl > kl_threshold`` or
``induce < induce_threshold`` are discarded; the lowest ``bypass`` wins. All thresholds are configurable,
and when nothing survives the result says which filter removed what and lists the closest candidates.

Speed: candidates share forward passes (each batch row carries its own direction), the layer filter is
applied before anything runs, and with ``prune=True`` the bypass score is only computed for candidates
that passed the KL and induce filters. ``prune=False`` scores every candidate (the reference sweep's
output, same choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .interventions import ablate_direction, add_direction
from .prompts import ChatFormatter
from .scoring import kl_divergence, last_logits, refusal_score_from_logits


@dataclass
class SelectionConfig:
    kl_threshold: float = 0.1
    """Discard candidates whose ablation moves harmless next-token distributions more than this (KL)."""
    max_layer_fraction: float = 0.8
    """Discard candidates at layers ≥ int(fraction × n_layers) (directions too close to the unembedding)."""
    induce_threshold: float = 0.0
    """Discard candidates whose addition leaves the mean harmless refusal score below this."""
    prune: bool = True
    """Skip the bypass score for candidates already removed by another filter (same choice, faster)."""
    batch_size: int = 32
    """Rows per forward pass (prompts × candidates)."""


@dataclass
class CandidateScore:
    position: int  # negative index from the end of the prompt, e.g. -1 = last template token
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    norm: float = 0.0
    removed_by: list[str] = field(default_factory=list)

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

    def to_json(self) -> dict:
        return {
            "chosen": None if self.chosen is None else {"position": self.chosen.position, "layer": self.chosen.layer},
            "baseline_refusal_score": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "filters": asdict(self.config),
            "explanation": self.explanation,
            "candidates": [asdict(s) for s in self.scores],
        }


def _rows_scores(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    directions: torch.Tensor,
    mode: str,
    refusal_ids: Sequence[int],
    batch_size: int,
    layer: int | None = None,
) -> torch.Tensor:
    """Last-position logits for every (direction, prompt) pair ``[n_dirs, n_prompts, vocab]``."""
    n_dirs, n = directions.shape[0], len(prompts)
    flat_prompts = [p for _ in range(n_dirs) for p in prompts]
    row_dirs = directions.repeat_interleave(n, dim=0)

    def context(rows: slice):
        if mode == "ablate":
            return ablate_direction(model, row_dirs[rows])
        return add_direction(model, row_dirs[rows], layer=layer, coeff=1.0)

    logits = last_logits(model, formatter, flat_prompts, batch_size, context)
    return logits.view(n_dirs, n, -1)


def select_direction(
    model: nn.Module,
    formatter: ChatFormatter,
    candidates: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    config: SelectionConfig | None = None,
    progress: bool = True,
) -> SelectionResult:
    """Score every candidate of ``candidates [n_pos, n_layers, d]`` and choose one (see module doc)."""
    cfg = config or SelectionConfig()
    n_pos, n_layers, _ = candidates.shape
    cand = candidates.float()
    base_harmless = last_logits(model, formatter, harmless_val, cfg.batch_size)
    base_harmful = last_logits(model, formatter, harmful_val, cfg.batch_size)
    score = lambda logits: refusal_score_from_logits(logits.flatten(0, -2), refusal_ids)  # noqa: E731

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
    bar = tqdm(total=2 * n_layers + 1, desc="selection", disable=not progress, leave=False)

    # induce: one pass per layer, the candidates of that layer (one per position) batched together.
    for layer in range(n_layers):
        keys = [k for k in live if k[1] == layer]
        if keys:
            dirs = torch.stack([cand[k] for k in keys])
            logits = _rows_scores(model, formatter, harmless_val, dirs, "add", refusal_ids, cfg.batch_size, layer)
            for k, row in zip(keys, logits):
                scores[k].induce = float(score(row).mean())
        bar.update()

    # kl: ablation on harmless prompts, all candidates batched.
    if live:
        dirs = torch.stack([cand[k] for k in live])
        logits = _rows_scores(model, formatter, harmless_val, dirs, "ablate", refusal_ids, cfg.batch_size)
        for k, row in zip(live, logits):
            scores[k].kl = float(kl_divergence(base_harmless, row).mean())
    bar.update(n_layers)

    for k in live:
        s = scores[k]
        if any(v is None or math.isnan(v) for v in (s.induce, s.kl)):
            s.removed_by.append("NaN score")
            continue
        if s.kl > cfg.kl_threshold:
            s.removed_by.append(f"kl > {cfg.kl_threshold}")
        if s.induce < cfg.induce_threshold:
            s.removed_by.append(f"induce < {cfg.induce_threshold}")

    # bypass: ablation on harmful prompts; pruned candidates are skipped unless nothing survives.
    need = [k for k in live if scores[k].kept or not cfg.prune]
    if not any(scores[k].kept for k in live):
        need = live  # score everything so the explanation can show the closest candidates
    if need:
        dirs = torch.stack([cand[k] for k in need])
        logits = _rows_scores(model, formatter, harmful_val, dirs, "ablate", refusal_ids, cfg.batch_size)
        for k, row in zip(need, logits):
            scores[k].bypass = float(score(row).mean())
            if math.isnan(scores[k].bypass) and "NaN score" not in scores[k].removed_by:
                scores[k].removed_by.append("NaN score")
    bar.update(n_layers)
    bar.close()

    ordered = [scores[(p, layer)] for p in range(n_pos) for layer in range(n_layers)]
    kept = [s for s in ordered if s.kept]
    chosen = min(kept, key=lambda s: s.bypass) if kept else None
    result = SelectionResult(
        scores=ordered,
        chosen=chosen,
        baseline_harmful=float(score(base_harmful).mean()),
        baseline_harmless=float(score(base_harmless).mean()),
        config=cfg,
    )
    result.explanation = explain(result)
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
    closest = sorted(
        (s for s in result.scores if s.bypass is not None and not math.isnan(s.bypass)),
        key=lambda s: s.bypass,
    )[:top]
    if closest:
        lines.append("closest candidates (lowest bypass):")
        lines += [
            f"  pos {s.position} layer {s.layer}: bypass {s.bypass:.3f} induce {s.induce:.3f} kl {s.kl:.4f} "
            f"(removed by {', '.join(s.removed_by)})"
            for s in closest
        ]
    lines.append(
        "relax a filter (--kl-threshold, --max-layer-fraction, --induce-threshold) or pick one with --layer/--position."
    )
    return "\n".join(lines)
