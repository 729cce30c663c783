"""Evaluate a model under several conditions (baseline, ablation, addition, orthogonalized weights, ...).

A *condition* is a name and a context factory (``None`` = the plain model). For each condition and each
prompt set (harmful / harmless / borderline, or any names), :func:`evaluate_conditions` generates replies,
judges them with every judge (substring, prefix, logit, optional model judge), and reports rates with
Wilson 95 % intervals, per-category rates and judge agreement. Against the baseline it adds first-token and
whole-reply KL on the harmless set, and for every condition the CE loss on plain text, instruction data and
the baseline's own harmless replies. The output is plain JSON (see ``docs/results-schema.md``) with no
timestamps, so the same seed gives a byte-identical ``results.json``.

Example:
    >>> direction = Direction.load("out/direction")                                     # doctest: +SKIP
    >>> conditions = standard_conditions(model, direction)                              # doctest: +SKIP
    >>> results = evaluate_conditions(model, tok, conditions, {"harmful": hf, "harmless": hl})  # doctest: +SKIP
    >>> results["conditions"]["ablation"]["harmful"]["refusal_rate"]                    # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.config_args import at_least, in_range, positive
from ..core.data import Prompt, sample
from ..core.errors import UserError
from ..core.io import atomic_write_json, provenance, staging_dir
from ..core.models import model_provenance
from ..core.prompts import ChatFormatter
from ..direction.compute import Direction
from ..direction.interventions import Positions, ablate_direction, add_direction
from ..direction.orthogonalize import project_out_along, refuse_inexact, refuse_offloaded, unit_direction
from ..direction.scoring import detect_refusal_tokens, last_logits
from .generation import Completion, ContextFactory, GenerationSettings, generate, save_completions
from .journal import CompletionJournal
from .judges import LogitJudge, PrefixJudge, SubstringJudge
from .metrics import (
    agreement,
    by_category,
    ce_loss,
    chat_rows,
    completion_rows,
    first_token_kl,
    plain_text_rows,
    rate_summary,
    reply_kl,
)

SCHEMA_VERSION = 1

Generator = Callable[..., list[Completion]]
"""``generator(condition, prompts, settings, *, formatter, prompt_set, progress) -> completions``."""


@dataclass
class EvalSettings:
    """What :func:`evaluate_conditions` measures and how."""

    max_new_tokens: int = field(default=128, metadata=at_least(1))
    """New tokens per reply (>= 128 catches delayed refusals)."""
    batch_size: int = field(default=16, metadata=at_least(1))
    """Prompts per generation / forward pass."""
    seed: int = 0
    """Seed for prompt sampling and (with --do-sample) decoding."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = field(default=1.0, metadata=positive())
    """Sampling temperature (with --do-sample)."""
    top_p: float = field(default=1.0, metadata=in_range(0, 1, lo_open=True))
    """Nucleus mass (with --do-sample)."""
    n_prompts: int | None = field(default=None, metadata=at_least(1))
    """Evaluate a seeded sample of this many prompts per set (default: all)."""
    kl: bool = True
    """Measure KL vs the baseline on the harmless set."""
    ce: bool = True
    """Measure CE loss (plain text, instruction data, own baseline replies)."""
    n_ce: int = field(default=64, metadata=at_least(1))
    """Texts / instruction pairs used for each CE loss (seeded sample)."""
    primary_judge: str = "substring"
    """The judge whose rate is reported as ``refusal_rate``."""

    def generation(self) -> GenerationSettings:
        return GenerationSettings(
            self.max_new_tokens, self.batch_size, self.do_sample, self.temperature, self.top_p, self.seed
        )


# --------------------------------------------------------------------------------------------- conditions
class OrthogonalizedWeights:
    """Context factory for weight orthogonalization: ``W ← W − r̂ r̂ᵀ W`` on every residual writer.

    The edited matrices are computed once (on first entry) and swapped in and out by reference, so entering the
    context per batch costs nothing and the original weights come back bit for bit. The price is one extra
    copy of the residual-writing matrices (embedding, attention out- and MLP down-projections). Tied
    input/output embeddings are untied inside the block only, so the unembedding is never edited.

    Example:
        >>> factory = OrthogonalizedWeights(model, direction.vector)          # doctest: +SKIP
        >>> with factory():                                                    # doctest: +SKIP
        ...     model.generate(**batch)
    """

    def __init__(self, model: nn.Module, direction: torch.Tensor, force: bool = False):
        refuse_inexact(get_adapter(model), force)
        refuse_offloaded(get_adapter(model))
        self.model, self.direction = model, direction
        self._edited: list[torch.Tensor] | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        adapter = get_adapter(self.model)
        writers = adapter.residual_writers()
        if self._edited is None:
            unit = unit_direction(self.direction)
            self._edited = [project_out_along(w.param.data, unit, w.axis) for w in writers]
        tied = adapter.tied_embeddings()
        originals = [w.param.data for w in writers]
        if tied:  # give the unembedding its own Parameter on the (unedited) original storage
            head = adapter.embed.weight.data.to(adapter.lm_head.weight.device)  # a copy only if on another device
            adapter.lm_head.weight = nn.Parameter(head, requires_grad=False)
        try:
            for w, edited in zip(writers, self._edited):
                w.param.data = edited
            yield
        finally:
            for w, original in zip(writers, originals):
                w.param.data = original
            if tied:
                adapter.lm_head.weight = adapter.embed.weight


def orthogonalized_weights(model: nn.Module, direction: torch.Tensor, force: bool = False):
    """One-off context manager form of :class:`OrthogonalizedWeights` (weights restored on exit)."""
    return OrthogonalizedWeights(model, direction, force)()


def standard_conditions(
    model: nn.Module,
    direction: Direction | None,
    interventions: Sequence[str] = ("ablate", "add", "orthogonalize"),
    coeff: float = 1.0,
    positions: Positions = "all",
) -> tuple[dict[str, ContextFactory | None], dict[str, dict[str, Any]]]:
    """The paper's conditions for ``direction``: baseline, ablation, addition (at its layer), orthogonalized.

    Returns ``(conditions, descriptions)``; a condition the model cannot support (weight orthogonalization of
    a post-norm family) is left out and its description says why.
    """
    conds: dict[str, ContextFactory | None] = {"baseline": None}
    info: dict[str, dict[str, Any]] = {"baseline": {"intervention": "none"}}
    if direction is None:
        return conds, info
    direction.check(model)
    r = direction.vector
    unknown = set(interventions) - {"ablate", "add", "orthogonalize", "none"}
    if unknown:
        raise UserError(f"unknown --intervention {sorted(unknown)}; choose from ablate, add, orthogonalize, none.")
    if "ablate" in interventions:
        conds["ablation"] = lambda: ablate_direction(model, r)
        info["ablation"] = {"intervention": "ablate", "layers": "all", "positions": "all"}
    if "add" in interventions:
        conds["addition"] = lambda: add_direction(model, r, direction.layer, coeff, positions)
        pos = positions if isinstance(positions, str) else list(positions)
        info["addition"] = {"intervention": "add", "layer": direction.layer, "coeff": coeff, "positions": pos}
    if "orthogonalize" in interventions:
        try:
            conds["orthogonalized"] = OrthogonalizedWeights(model, r)
            info["orthogonalized"] = {"intervention": "orthogonalize"}
        except UserError as exc:
            info["orthogonalized"] = {"intervention": "orthogonalize", "skipped": str(exc)}
    return conds, info


# --------------------------------------------------------------------------------------------- evaluation
def _prompts(items: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(str(p)) for p in items]


def _set_summary(
    comps: list[Completion], judgements: dict[str, list[bool]], primary: str, scores: list[float] | None
) -> dict[str, Any]:
    main = judgements[primary]
    summary = rate_summary(main)
    out: dict[str, Any] = {
        "n": summary["n"],
        "refusal_rate": summary["rate"],
        "ci95": summary["ci95"],
        "judges": {name: rate_summary(flags) for name, flags in judgements.items()},
        "agreement": agreement(judgements),
        "by_category": by_category(main, [c.category for c in comps]),
        "finished_rate": sum(c.finished for c in comps) / len(comps),
        "mean_reply_tokens": sum(c.n_tokens for c in comps) / len(comps),
    }
    if scores is not None:
        out["mean_refusal_score"] = sum(scores) / len(scores)
    return out


def evaluate_conditions(
    model: nn.Module,
    tokenizer: Any,
    conditions: Mapping[str, ContextFactory | None],
    prompt_sets: Mapping[str, Sequence[Prompt | str]],
    settings: EvalSettings | None = None,
    *,
    judges: Sequence[Any] = (),
    refusal_tokens: Sequence[int] | None = None,
    formatter: ChatFormatter | None = None,
    plain_text: Sequence[str] | None = None,
    instruction_pairs: Sequence[tuple[str, str]] | None = None,
    direction: Direction | None = None,
    descriptions: Mapping[str, dict[str, Any]] | None = None,
    progress: bool = True,
    return_completions: bool = False,
    generator: Generator | None = None,
    journal: CompletionJournal | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], list[Completion]]:
    """Evaluate every condition on every prompt set; returns the ``results.json`` dict.

    ``judges`` are extra judges (e.g. a :class:`~refusal_lens.evaluation.judges.ModelJudge`) besides the substring,
    prefix and logit judges. The baseline for KL and own-reply CE is the condition named "baseline" (else the
    first one whose factory is ``None``). With ``return_completions`` returns ``(results, completions)``.
    ``generator`` replaces :func:`~refusal_lens.evaluation.generation.generate` for the replies (e.g. the vLLM backend,
    :class:`~refusal_lens.evaluation.vllm_backend.VLLMGenerator`); judges, KL and CE still run on ``model``.
    """
    cfg = settings or EvalSettings()
    fmt = formatter or ChatFormatter(tokenizer)
    sets = {k: _prompts(v) for k, v in prompt_sets.items()}
    for name, items in sets.items():
        if not items:
            raise UserError(f"the {name} prompt set is empty; give at least one instruction.")
    if cfg.n_prompts is not None:
        sets = {k: sample(v, cfg.n_prompts, cfg.seed) for k, v in sets.items()}
    if not conditions:
        raise UserError("no conditions to evaluate; give at least a baseline.")
    texts = {k: [p.instruction for p in v] for k, v in sets.items()}
    first, last = next(iter(texts.values())), list(texts.values())[-1]
    ids = list(refusal_tokens) if refusal_tokens else detect_refusal_tokens(
        model, fmt, texts.get("harmful", first), texts.get("harmless", last)
    )  # fmt: skip
    logit = LogitJudge(model, fmt, ids, batch_size=cfg.batch_size)
    all_judges = [SubstringJudge(), PrefixJudge(), *judges]
    names = [j.name for j in all_judges] + [logit.name]
    if len(set(names)) != len(names):
        raise UserError(f"judge names must be unique, got {names}; rename the model judge.")
    if cfg.primary_judge not in names:
        raise UserError(f"primary judge {cfg.primary_judge!r} is not one of {names}.")
    baseline = "baseline" if "baseline" in conditions else next((k for k, v in conditions.items() if v is None), None)
    gen = cfg.generation()
    completions: list[Completion] = []
    results_conds: dict[str, Any] = {}
    pooled: dict[str, list[bool]] = {n: [] for n in names}
    base_reply: dict[str, list[Completion]] = {}
    order = ([baseline] if baseline else []) + [c for c in conditions if c != baseline]
    for cond in order:
        factory = conditions[cond]
        entry: dict[str, Any] = {}
        for set_name, items in sets.items():
            if generator is None:
                comps = generate(
                    model, tokenizer, items, factory, gen, formatter=fmt, intervention=cond, prompt_set=set_name,
                    progress=progress, journal=journal,
                )  # fmt: skip
            else:
                comps = generator(cond, items, gen, formatter=fmt, prompt_set=set_name, progress=progress)
            replies = [c.completion for c in comps]
            judgements = {j.name: list(j.judge(texts[set_name], replies)) for j in all_judges}
            scored = logit.under(factory)
            judgements[logit.name] = scored.judge(texts[set_name], replies)
            for i, c in enumerate(comps):
                c.judgements = {n: bool(judgements[n][i]) for n in names}
            for n in names:
                pooled[n].extend(judgements[n])
            entry[set_name] = _set_summary(comps, {n: judgements[n] for n in names}, cfg.primary_judge, scored.scores)
            completions.extend(comps)
            if cond == baseline:
                base_reply[set_name] = comps
        entry.update(_divergence(model, tokenizer, fmt, cond, factory, baseline, sets, base_reply, cfg))
        entry.update(_losses(model, tokenizer, fmt, factory, base_reply, plain_text, instruction_pairs, cfg))
        if descriptions and cond in descriptions:
            entry["description"] = dict(descriptions[cond])
        results_conds[cond] = entry
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        **model_provenance(model),  # "model", and for a GGUF input its sha256 and quantization
        "direction": None
        if direction is None
        else {"layer": direction.layer, "position": direction.position, "norm": float(direction.vector.norm())},
        "settings": asdict(cfg),
        "refusal_tokens": {"ids": ids, "tokens": [tokenizer.decode([i]) for i in ids]},
        "judges": [{"name": j.name, "kind": getattr(j, "kind", "refusal")} for j in [*all_judges, logit]],
        "primary_judge": cfg.primary_judge,
        "baseline": baseline,
        "prompt_sets": {k: {"n": len(v)} for k, v in sets.items()},
        "skipped_conditions": {
            k: v["skipped"] for k, v in (descriptions or {}).items() if isinstance(v, dict) and "skipped" in v
        },
        "agreement_overall": agreement(pooled),
        "conditions": results_conds,
    }
    return (results, completions) if return_completions else results


def _divergence(
    model: nn.Module,
    tokenizer: Any,
    fmt: ChatFormatter,
    cond: str,
    factory: ContextFactory | None,
    baseline: str | None,
    sets: Mapping[str, list[Prompt]],
    base_reply: Mapping[str, list[Completion]],
    cfg: EvalSettings,
) -> dict[str, Any]:
    """First-token and reply KL vs the baseline on the harmless set (0 for the baseline itself)."""
    if not cfg.kl or baseline is None or "harmless" not in sets:
        return {"kl_harmless": None, "kl_harmless_reply": None}
    if cond == baseline or factory is None:
        zero = {"mean": 0.0, "mean_per_reply": 0.0, "max": 0.0}
        return {"kl_harmless": 0.0, "kl_harmless_answered": 0.0, "kl_harmless_reply": zero}
    prompts = [p.instruction for p in sets["harmless"]]
    base_logits = last_logits(model, fmt, prompts, cfg.batch_size)
    first = first_token_kl(model, fmt, prompts, factory, cfg.batch_size, baseline=base_logits)
    rows = completion_rows(fmt, base_reply["harmless"])
    pad = tokenizer.pad_token_id or 0
    reply = reply_kl(model, rows, factory, max(1, cfg.batch_size // 2), pad) if rows else None
    # The mean over all harmless prompts includes those the baseline wrongly refuses, where a large change
    # is the intended effect of removing refusal; the mean over the ones it answers measures collateral damage.
    answered = [kl for kl, c in zip(first, base_reply["harmless"]) if not c.judgements.get(cfg.primary_judge)]
    return {
        "kl_harmless": sum(first) / len(first),
        "kl_harmless_answered": sum(answered) / len(answered) if answered else None,
        "kl_harmless_reply": reply,
    }


def _losses(
    model: nn.Module,
    tokenizer: Any,
    fmt: ChatFormatter,
    factory: ContextFactory | None,
    base_reply: Mapping[str, list[Completion]],
    plain_text: Sequence[str] | None,
    pairs: Sequence[tuple[str, str]] | None,
    cfg: EvalSettings,
) -> dict[str, Any]:
    if not cfg.ce:
        return {}
    pad = tokenizer.pad_token_id or 0
    bs = max(1, cfg.batch_size // 2)
    out: dict[str, Any] = {"plain_text": None, "instruction": None, "own_completions": None}
    if plain_text:
        rows = plain_text_rows(tokenizer, sample(plain_text, cfg.n_ce, cfg.seed))
        out["plain_text"] = ce_loss(model, rows, factory, bs, pad) if rows else None
    if pairs:
        rows = chat_rows(fmt, sample(pairs, cfg.n_ce, cfg.seed))
        out["instruction"] = ce_loss(model, rows, factory, bs, pad) if rows else None
    own = base_reply.get("harmless")
    if own:
        rows = completion_rows(fmt, own[: cfg.n_ce])
        out["own_completions"] = ce_loss(model, rows, factory, bs, pad) if rows else None
    return {"ce_loss": out}


# --------------------------------------------------------------------------------------------- saving
def save_evaluation(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    completions: Sequence[Completion],
    extra_provenance: Mapping[str, Any] | None = None,
    direction_dir: str | os.PathLike | None = None,
    finalize: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``results.json``, ``completions.jsonl``, ``provenance.json`` (and the HTML report) atomically.

    The folder is built in a staging folder and renamed at the end, so a failure leaves no partial output.
    ``selection.json``/``direction.json`` beside the direction are copied so the report can show the
    candidate heat maps.
    """
    with staging_dir(out_dir) as stage:
        write_evaluation(stage, results, completions, extra_provenance, direction_dir, finalize)
    return Path(out_dir)


def write_evaluation(
    stage: Path,
    results: Mapping[str, Any],
    completions: Sequence[Completion],
    extra_provenance: Mapping[str, Any] | None = None,
    direction_dir: str | os.PathLike | None = None,
    finalize: Callable[[Path], object] | None = None,
) -> None:
    """The files of :func:`save_evaluation`, written into ``stage`` (a folder the caller renames into place)."""
    atomic_write_json(stage / "results.json", results)
    save_completions(stage / "completions.jsonl", completions)
    atomic_write_json(stage / "provenance.json", provenance(**dict(extra_provenance or {})))
    if direction_dir is not None:
        src = Path(direction_dir)
        src = src if src.is_dir() else src.parent
        for name in ("selection.json", "direction.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, stage / name)
    if finalize is not None:  # e.g. report.build_report: runs inside the staging folder, so it is atomic too
        finalize(stage)
