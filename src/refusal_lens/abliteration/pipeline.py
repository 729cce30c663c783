"""``abliterate``: directions → structured search → front checked by generation → the chosen point.

Example:
    >>> result = abliterate(model, tok, harmful, harmless, checkpoint="run.jsonl", max_kl=0.01)  # doctest: +SKIP
    >>> result.chosen["refusal_generated"], result.chosen["kl"]                                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..core.adapters import get_adapter
from ..core.errors import UserError
from ..core.models import model_name
from ..core.progress import progress_bar
from ..core.prompts import ChatFormatter
from ..direction.scoring import detect_refusal_tokens
from ..direction.variants import DirectionSet
from .checkpoint import Checkpoint
from .gradient import GradientSearch, strength_gradients
from .objectives import Evaluator, generated_refusals
from .points import Point
from .search import Search, SearchConfig, fewest_greedy, greedy_refusal, pareto_front


@dataclass
class AbliterateConfig:
    n_train: int = 256
    """Harmful and harmless prompts each whose mean activations give the directions."""
    n_search: int = 64
    """Harmful prompts (held out from the directions) whose refusal scores every search point."""
    n_kl: int | None = None
    """Harmless prompts (held out from the directions) whose first-token KL scores every search point; default
    4 × --n-search. KL over few prompts is heavy-tailed and the search fits it: on the organism, the chosen points'
    KL on fresh prompts was 1.4–1.8× the search KL with 100 prompts, 1.0–1.1× with 300."""
    strategy: str = "auto"
    """Search: "coordinate" (direction scan, kernel-shape grid, coordinate descent of the kernels), "gradient"
    (direction scan, then steps along KL bounds with a free strength per layer, from the gradients of both
    objectives: fewer scored points, but its edits fit the search prompts more closely), or "auto": coordinate
    where its scan and grid (2 × layers + 36 points) leave at least half of --max-evaluations to refine, else
    gradient. On the 8-layer organism the coordinate search generalised better; on SmolLM2 (30 layers, 150 points)
    it left 31 of 39 replies refusing at KL 0.096, the gradient search 3 at 0.081 (docs/abliteration.md)."""
    max_evaluations: int = 150
    """Most points the search scores (first-token objectives, one forward pass per batch each; a gradient step is
    one point that costs about three)."""
    check_points: int = 8
    """Front points checked by generating replies (the chosen point is always among them)."""
    check_tokens: int = 64
    """New tokens per greedy reply when checking the front (substring refusal judge)."""
    norm_preserving: bool = False
    """Norm-preserving ("biprojected") weight edits: every edited row keeps its norm."""
    batch_size: int = 32
    """Prompts per forward pass."""
    seed: int = 0
    """Seed for splitting the prompts into direction and search sets."""


@dataclass
class AbliterationResult:
    directions: DirectionSet
    rows: list[dict[str, Any]]  # every scored point
    front: list[dict[str, Any]]  # checked points not dominated in (generated refusal, KL)
    chosen: dict[str, Any]
    refusal_ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def point(self) -> Point:
        return Point.from_json(self.chosen["point"])


def split_prompts(items: Sequence[str], n_train: int, n_search: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (train, search) samples: the search set is held out from the directions."""
    if len(items) < 4:
        raise UserError(f"abliterate needs at least 4 prompts of each kind; got {len(items)}.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_s = min(n_search, len(items) // 2)
    return [items[i] for i in order[n_s : n_s + n_train]], [items[i] for i in order[:n_s]]


STRATEGIES = ("auto", "coordinate", "gradient")


def resolve_strategy(strategy: str, n_layers: int, max_evaluations: int) -> str:
    """The search to run: ``auto`` picks coordinate while its direction scan and kernel grid take at most half
    the budget (they grow with depth), else gradient, whose scan is a fixed size."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}.")
    if strategy != "auto":
        return strategy
    return "coordinate" if 2 * n_layers + 36 <= max_evaluations / 2 else "gradient"


def data_hash(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def pick(front: list[dict[str, Any]], max_kl: float | None, max_refusal: float | None) -> dict[str, Any]:
    """Fewest generated refusals with KL ≤ max_kl, or lowest KL with refusal rate ≤ max_refusal."""
    if max_refusal is not None:
        ok = [r for r in front if r["refusal_generated"] <= max_refusal + 1e-12]
        if not ok:
            best = min(r["refusal_generated"] for r in front)
            raise UserError(f"no front point has a refusal rate <= {max_refusal}; the lowest is {best:.3f}. "
                            "Raise --max-refusal or --max-evaluations.")  # fmt: skip
        return min(ok, key=lambda r: (r["kl"], r["refusal_generated"]))
    limit = 0.02 if max_kl is None else max_kl
    ok = [r for r in front if r["kl"] <= limit]
    if not ok:
        best = min(r["kl"] for r in front)
        raise UserError(f"no front point has KL <= {limit}; the lowest is {best:.4f}. Raise --max-kl.")
    return min(ok, key=lambda r: (r["refusal_generated"], r["kl"]))


def _to_check(
    front: list[dict[str, Any]], k: int, max_kl: float | None, max_refusal: float | None, near: tuple[float, ...] = ()
) -> list[dict]:
    """Front points worth generating for: the best under the user's bound, the lowest-KL one as refusal-free, the
    best under each ``near × max_kl``, more of the best under the bound, then a spread of the rest."""
    if max_refusal is not None:
        under = sorted((r for r in front if greedy_refusal(r) <= 1.5 * max_refusal + 0.02), key=lambda r: r["kl"])
    else:
        limit = 0.02 if max_kl is None else max_kl
        under = sorted((r for r in front if r["kl"] <= limit), key=greedy_refusal)
    chosen = under[:1]
    if max_refusal is None and under:  # and the lowest-KL point with as few greedy refusals (the pick's tie-break)
        lowest = fewest_greedy(under)
        chosen += [lowest] if lowest not in chosen else []
    for fraction in near if max_kl is not None and max_refusal is None else ():
        lower = fewest_greedy(r for r in front if r["kl"] <= fraction * max_kl and r not in chosen)
        if lower is not None and len(chosen) < k:  # what less KL costs in refusal: the best point there
            chosen.append(lower)
    chosen += [r for r in under[1 : max(1, k // 2)] if r not in chosen][: max(0, k - len(chosen))]
    rest = sorted((r for r in front if r not in chosen), key=lambda r: r["kl"])
    # the others spread evenly in log KL (a gradient search leaves many front points close together)
    logs = [math.log(max(r["kl"], 1e-6)) for r in rest]
    n = min(k - len(chosen), len(rest))
    for i in range(n):
        target = logs[0] + (logs[-1] - logs[0]) * i / max(n - 1, 1)
        free = [j for j in range(len(rest)) if rest[j] not in chosen]
        chosen.append(rest[min(free, key=lambda j: abs(logs[j] - target))])
    unique = {json.dumps(r["point"], sort_keys=True): r for r in chosen}
    return list(unique.values())


def abliterate(
    model: nn.Module,
    tokenizer: object,
    harmful: Sequence[str],
    harmless: Sequence[str],
    checkpoint: str,
    config: AbliterateConfig | None = None,
    harmful_search: Sequence[str] | None = None,
    harmless_search: Sequence[str] | None = None,
    system: str | None = None,
    chat_template: str | None = None,
    refusal_ids: Sequence[int] | None = None,
    max_kl: float | None = None,
    max_refusal: float | None = None,
    progress: bool = True,
    force: bool = False,
) -> AbliterationResult:
    """Search the (refusal, KL) front and pick a point; every scored point is checkpointed to ``checkpoint``."""
    cfg = config or AbliterateConfig()
    t0 = time.perf_counter()
    strategy = resolve_strategy(cfg.strategy, get_adapter(model).n_layers, cfg.max_evaluations)
    fmt = ChatFormatter(tokenizer, system=system, chat_template=chat_template)
    harmful_train, hf_search = split_prompts(list(harmful), cfg.n_train, cfg.n_search, cfg.seed)
    n_kl = 4 * cfg.n_search if cfg.n_kl is None else cfg.n_kl
    harmless_train, hl_search = split_prompts(list(harmless), cfg.n_train, n_kl, cfg.seed)
    if harmful_search is not None:
        harmful_train, hf_search = list(harmful)[: cfg.n_train], list(harmful_search)[: cfg.n_search]
    if harmless_search is not None:
        harmless_train, hl_search = list(harmless)[: cfg.n_train], list(harmless_search)[:n_kl]
    ids = list(refusal_ids) if refusal_ids else detect_refusal_tokens(model, fmt, harmful_train, harmless_train)
    directions = DirectionSet.from_prompts(model, fmt, harmful_train, harmless_train, cfg.batch_size)
    # the gradient search scores its points in the gradient pass, and its scan and line edit every layer: the
    # residuals kept for the tail shortcut would go unused (unless norm-preserving points are rescored by edits)
    evaluator = Evaluator(model, fmt, hf_search, hl_search, ids, cfg.batch_size, cfg.norm_preserving, force,
                          tail_cache=strategy == "coordinate" or cfg.norm_preserving)  # fmt: skip
    fingerprint = {
        "model": model_name(model),
        "data": [data_hash(x) for x in (harmful_train, harmless_train, hf_search, hl_search)],
        "system": system,
        "refusal_ids": ids,
        # the budget and the checks do not change any score, so a resumed run may change them
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("check_points", "check_tokens", "max_evaluations")}
        | {"strategy": strategy},  # the search that ran, so "auto" resumes a coordinate checkpoint and vice versa
    }
    store = Checkpoint(checkpoint, fingerprint)
    resumed = len(store.rows)
    search_cfg = SearchConfig(
        max_evaluations=cfg.max_evaluations,
        target_kl=(0.02 if max_kl is None else max_kl) if max_refusal is None else None,
        target_refusal=max_refusal,
    )
    if strategy == "gradient":
        search: Search = GradientSearch(
            directions, evaluator, store, search_cfg, progress,
            gradients=lambda plan: strength_gradients(evaluator, plan), exact_hooks=not cfg.norm_preserving,
        )  # fmt: skip
    else:
        search = Search(directions, evaluator, store, search_cfg, progress)
    search.t0 = t0  # a point's "seconds" count from the start of the whole run (directions included)
    rows = search.run()
    t_search = time.perf_counter() - t0
    front = pareto_front(rows, "greedy")  # the generated refusal count follows the greedy first token
    checked = []
    base_n, _ = generated_refusals(model, tokenizer, fmt, hf_search, None, cfg.check_tokens, cfg.batch_size)
    to_check = _to_check(front, cfg.check_points, max_kl, max_refusal, search_cfg.near_bounds)
    for row in progress_bar(to_check, desc="check front", disable=not progress):
        plan = Point.from_json(row["point"]).plan(directions)
        n, _ = generated_refusals(
            model, tokenizer, fmt, hf_search, plan, cfg.check_tokens, cfg.batch_size, cfg.norm_preserving, force
        )
        checked.append({**row, "refusals_generated": n, "refusal_generated": n / len(hf_search)})
    checked_front = pareto_front(checked, "refusal_generated")
    chosen = pick(checked_front, max_kl, max_refusal)
    info = {
        "n_prompts": {
            "harmful_train": len(harmful_train),
            "harmless_train": len(harmless_train),
            "harmful_search": len(hf_search),
            "harmless_search": len(hl_search),
        },  # fmt: skip
        "data_sha256": dict(
            zip(("harmful_train", "harmless_train", "harmful_search", "harmless_search"), fingerprint["data"])
        ),  # fmt: skip
        "refusal_ids": ids,
        "refusal_tokens": [tokenizer.decode([i]) for i in ids],
        "baseline": {**evaluator.base.to_json(), "refusals_generated": base_n, "n_harmful_search": len(hf_search)},
        "evaluations": len(rows),
        "evaluations_resumed": resumed,
        "seconds_search": t_search,
        "seconds_total": time.perf_counter() - t0,
        "checked": checked,
        "system": system,
        "strategy": strategy,
    }
    return AbliterationResult(directions, rows, checked_front, chosen, ids, info)
