"""How sure is the selection? Bootstrap over the validation prompts, from the per-prompt scores already computed.

The selection's scores are means over a few validation prompts (the paper: 32 each), and per-prompt KL is
heavy-tailed (on a held-out organism: mean 0.17-0.25, median 0.0003, max 8-11), so whether a candidate passes
``kl <= 0.1`` can depend on which prompts were drawn. Resampling the harmful and harmless validation prompts
with replacement and re-running the *same* choice rule on the resampled means (no new forward passes) gives:

* a percentile interval for each fully scored candidate's ``bypass``, ``induce`` and ``kl``;
* how often each candidate is chosen across resamples (``choice_frequency``), and a warning when the chosen
  one wins in fewer than half of them.

Only candidates with every per-prompt score can be chosen in a resample. With pruning (the default), a
candidate whose KL scoring stopped early (its partial sum already proved ``kl > threshold``) or whose later
scores were skipped counts as failing in every resample, so the frequencies are conditional on pruning;
``--no-prune`` scores everything and makes them exact. The selection itself is unchanged (paper-faithful).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

Key = Hashable
METRICS = ("bypass", "induce", "kl")


def _matrix(values: Mapping[Key, Mapping[int, float]], keys: Sequence[Key], n: int) -> torch.Tensor:
    """``[len(keys), n]`` float64, NaN where a (candidate, prompt) score was not computed."""
    out = torch.full((len(keys), n), math.nan, dtype=torch.float64)
    for j, k in enumerate(keys):
        for i, v in values.get(k, {}).items():
            out[j, i] = v
    return out


def _draw_counts(n: int, n_resamples: int, gen: torch.Generator) -> torch.Tensor:
    """``counts[b, i]``: how often prompt i is drawn in resample b (n draws with replacement)."""
    draws = torch.randint(n, (n_resamples, n), generator=gen)
    counts = torch.zeros(n_resamples, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones(n_resamples, n, dtype=torch.float64))


def bootstrap_selection(
    keys: Sequence[Key],
    per_prompt: Mapping[str, Mapping[Key, Mapping[int, float]]],
    n_harmful: int,
    n_harmless: int,
    allowed: Sequence[bool],
    kl_threshold: float,
    induce_threshold: float,
    chosen: Key | None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    names: Mapping[Key, str] | None = None,
) -> dict[str, Any]:
    """Bootstrap the selection rule (lowest bypass among candidates with kl <= and induce >= thresholds).

    ``per_prompt[metric][key][prompt index]`` holds the per-prompt scores (bypass on harmful prompts, induce
    and kl on harmless ones); ``allowed[j]`` is False for candidates removed by prompt-independent filters
    (layer, zero vector, NaN). Returns JSON-ready intervals, choice frequencies and a stability verdict.
    """
    names = names or {k: str(k) for k in keys}
    kl = _matrix(per_prompt.get("kl", {}), keys, n_harmless)
    induce = _matrix(per_prompt.get("induce", {}), keys, n_harmless)
    bypass = _matrix(per_prompt.get("bypass", {}), keys, n_harmful)
    complete = ~(kl.isnan().any(1) | induce.isnan().any(1) | bypass.isnan().any(1))
    complete &= torch.tensor(list(allowed), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    counts_b, counts_h = _draw_counts(n_harmless, n_resamples, gen), _draw_counts(n_harmful, n_resamples, gen)
    means = {  # [n_resamples, n_candidates]; NaN rows of incomplete candidates are masked below
        "kl": counts_b @ kl.nan_to_num(0).T / n_harmless,
        "induce": counts_b @ induce.nan_to_num(0).T / n_harmless,
        "bypass": counts_h @ bypass.nan_to_num(0).T / n_harmful,
    }
    ok = complete.unsqueeze(0) & (means["kl"] <= kl_threshold) & (means["induce"] >= induce_threshold)
    masked = torch.where(ok, means["bypass"], torch.full_like(means["bypass"], math.inf))
    winner = masked.argmin(1)
    winner[~ok.any(1)] = -1  # no candidate passed in this resample
    freq = torch.bincount(winner + 1, minlength=len(keys) + 1).double() / n_resamples
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    intervals = {}
    for j, k in enumerate(keys):
        if complete[j]:
            intervals[names[k]] = {
                m: [float(means[m][:, j].quantile(lo_q)), float(means[m][:, j].quantile(hi_q))] for m in METRICS
            }
    frequency = {names[keys[j]]: float(freq[j + 1]) for j in range(len(keys)) if freq[j + 1] > 0}
    frequency = dict(sorted(frequency.items(), key=lambda kv: -kv[1]))
    chosen_freq = frequency.get(names[chosen], 0.0) if chosen is not None else None
    out: dict[str, Any] = {
        "n_resamples": n_resamples,
        "level": level,
        "seed": seed,
        "n_fully_scored": int(complete.sum()),
        "exact": bool(complete.sum() == sum(allowed)),
        "none_passed_fraction": float(freq[0]),
        "choice_frequency": frequency,
        "intervals": intervals,
        "chosen_frequency": chosen_freq,
        "stable": None if chosen_freq is None else chosen_freq >= 0.5,
    }
    out["summary"] = summary_line(out, None if chosen is None else names[chosen])
    return out


def summary_line(boot: Mapping[str, Any], chosen: str | None) -> str:
    """One line for the explanation: how often the choice recurs, and its intervals."""
    pct = f"{100 * (boot['none_passed_fraction'] if chosen is None else boot['chosen_frequency']):.0f}%"
    others = [(k, v) for k, v in boot["choice_frequency"].items() if k != chosen][:2]
    alt = ", ".join(f"{k} {100 * v:.0f}%" for k, v in others) or "none"
    scope = "" if boot["exact"] else f"; among the {boot['n_fully_scored']} fully scored candidates, --no-prune: all"
    if chosen is None:
        return (
            f"bootstrap ({boot['n_resamples']} resamples of the validation prompts{scope}): no candidate passes in "
            f"{pct} of resamples; most often chosen otherwise: {alt}."
        )
    ci = boot["intervals"].get(chosen, {})
    spans = ", ".join(f"{m} [{ci[m][0]:.3g}, {ci[m][1]:.3g}]" for m in METRICS if m in ci)
    verdict = "" if boot["stable"] else "WARNING: unstable choice (chosen in fewer than half the resamples). "
    return (
        f"{verdict}bootstrap ({boot['n_resamples']} resamples of the validation prompts{scope}): {chosen} chosen in "
        f"{pct}; next: {alt}; {int(100 * boot['level'])}% intervals: {spans}; none passes in "
        f"{100 * boot['none_passed_fraction']:.0f}%."
    )
