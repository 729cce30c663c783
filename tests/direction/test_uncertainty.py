"""Bootstrap of the selection: planted heavy-tailed KL against the exact resampling probability, and the wiring."""

from __future__ import annotations

import torch

from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.selection import SelectionConfig, select_direction
from refusal_lens.direction.uncertainty import bootstrap_selection
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS


def test_heavy_tailed_kl_candidate_wins_as_often_as_its_outlier_is_left_out():
    n = 32
    keys = ["steady", "tailed"]
    # steady: passes everywhere, bypass 1.0. tailed: better bypass 0.0, KL 0 on every prompt but one (KL 10, so the
    # full mean 0.31 fails kl <= 0.1); it passes exactly in the resamples that leave that prompt out.
    per_prompt = {
        "kl": {"steady": dict.fromkeys(range(n), 0.01), "tailed": {i: (10.0 if i == 7 else 0.0) for i in range(n)}},
        "induce": {k: dict.fromkeys(range(n), 1.0) for k in keys},
        "bypass": {"steady": dict.fromkeys(range(n), 1.0), "tailed": dict.fromkeys(range(n), 0.0)},
    }
    boot = bootstrap_selection(keys, per_prompt, n, n, [True, True], 0.1, 0.0, "steady", n_resamples=4000)
    p_left_out = (1 - 1 / n) ** n  # 0.360: exact probability that one prompt is never drawn in n draws
    assert abs(boot["choice_frequency"]["tailed"] - p_left_out) < 0.03
    assert abs(boot["chosen_frequency"] - (1 - p_left_out)) < 0.03 and boot["stable"]
    assert boot["intervals"]["steady"]["kl"] == [0.01, 0.01] or abs(boot["intervals"]["steady"]["kl"][0] - 0.01) < 1e-12
    lo, hi = boot["intervals"]["tailed"]["kl"]
    assert lo == 0.0 and hi > 0.3  # the interval shows the tail
    assert "chosen in" in boot["summary"] and "WARNING" not in boot["summary"]
    # make the outlier rarer to leave out: choose 'tailed' by fiat and the verdict flips to unstable
    flipped = bootstrap_selection(keys, per_prompt, n, n, [True, True], 0.1, 0.0, "tailed", n_resamples=2000)
    assert not flipped["stable"] and flipped["summary"].startswith("WARNING: unstable choice")


def test_incomplete_or_disallowed_candidates_are_never_chosen():
    n = 4
    per_prompt = {
        "kl": {"a": dict.fromkeys(range(n), 0.0), "b": {0: 0.0}},  # b: KL scoring stopped early
        "induce": {"a": dict.fromkeys(range(n), 1.0), "b": dict.fromkeys(range(n), 1.0)},
        "bypass": {"a": dict.fromkeys(range(n), 0.5), "b": dict.fromkeys(range(n), -9.0)},
    }
    boot = bootstrap_selection(["a", "b"], per_prompt, n, n, [True, True], 0.1, 0.0, "a", n_resamples=100)
    assert boot["choice_frequency"] == {"a": 1.0} and boot["n_fully_scored"] == 1 and not boot["exact"]
    boot = bootstrap_selection(["a", "b"], per_prompt, n, n, [False, True], 0.1, 0.0, None, n_resamples=100)
    assert boot["none_passed_fraction"] == 1.0 and boot["choice_frequency"] == {}
    assert (
        boot["chosen_frequency"] is None and boot["stable"] is None and "no candidate passes in 100%" in boot["summary"]
    )


def test_selection_json_carries_the_bootstrap_of_its_own_per_prompt_scores(tokenizer):
    model = random_model("llama", n_layers=4, d_model=32, seed=3)
    fmt = ChatFormatter(tokenizer)
    ids = tokenizer("sorry", add_special_tokens=False)["input_ids"][:1]
    candidates = torch.randn(fmt.n_eoi, 4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = SelectionConfig(kl_threshold=10.0, induce_threshold=-1e9, prune=False, bootstrap=200)
    result = select_direction(model, fmt, candidates, HARMFUL[:4], HARMLESS[:4], ids, cfg, progress=False)
    boot = result.to_json()["bootstrap"]
    assert boot["exact"] and boot["n_resamples"] == 200 and result.chosen is not None
    name = f"pos {result.chosen.position} layer {result.chosen.layer}"
    assert boot["chosen_frequency"] == boot["choice_frequency"].get(name, 0.0)
    assert abs(sum(boot["choice_frequency"].values()) + boot["none_passed_fraction"] - 1) < 1e-9
    for s in result.scores:  # each interval brackets the full-sample mean it was resampled from
        ci = boot["intervals"].get(f"pos {s.position} layer {s.layer}")
        if ci is not None:
            for m in ("bypass", "induce", "kl"):
                assert ci[m][0] - 1e-9 <= getattr(s, m) <= ci[m][1] + 1e-9
    assert "bootstrap (200 resamples" in result.explanation
    off = select_direction(
        model, fmt, candidates, HARMFUL[:4], HARMLESS[:4], ids, SelectionConfig(bootstrap=0), progress=False
    )
    assert off.bootstrap is None
