"""Shared helpers for the benchmarks: timing two things side by side and the models they run on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Result:
    name: str
    ratio: float | None  # >1 means ours is better (faster / leaner), whatever is measured
    target: float
    ratios: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        r = self.ratios or ([self.ratio] if self.ratio is not None else [])
        return {
            "name": self.name,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "min": min(r) if r else None,
            "median": statistics.median(r) if r else None,
            "max": max(r) if r else None,
            "repeats": len(r),
            "details": self.details,
            "note": self.note,
        }


def interleaved_ratio(reference: Callable[[], Any], ours: Callable[[], Any], repeats: int) -> tuple[list[float], dict]:
    """Time ``reference`` and ``ours`` alternately (so load drifts hit both); ratio = t_reference / t_ours."""
    reference()
    ours()  # warm-up: first calls pay for allocation and lazy initialisation
    ratios, t_ref, t_ours = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reference()
        t1 = time.perf_counter()
        ours()
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_ours.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return ratios, {"reference_s_median": statistics.median(t_ref), "ours_s_median": statistics.median(t_ours)}


def organism_or_random(quick: bool) -> tuple[torch.nn.Module, Any, str]:
    """The built-in organism when it is installed, else a random Llama with the toy tokenizer."""
    try:
        from refusal_lens.core.models import load_model

        model, tok = load_model()
        return model, tok, "organism"
    except Exception:
        from refusal_lens.testing import random_model, toy_tokenizer

        return random_model("llama", n_layers=8, d_model=128), toy_tokenizer(), "random llama 8x128"
