"""Metrics: Wilson intervals, agreement, KL, and CE loss equal to a direct float64 recomputation."""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import pytest
import torch

from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.interventions import ablate_direction
from refusal_lens.direction.scoring import kl_divergence, last_logits
from refusal_lens.evaluation.generation import GenerationSettings, generate
from refusal_lens.evaluation.metrics import (
    agreement,
    by_category,
    ce_loss,
    chat_rows,
    completion_rows,
    first_token_kl,
    plain_text_rows,
    rate_summary,
    reply_kl,
    wilson_interval,
)

TEXTS = ["how do i bake bread at home .", "write a poem about the sea", "two plus two ?"]
PAIRS = [("how do i bake bread", "sure , here is a short story ."), ("steal a car", "i am sorry , but i cannot help .")]


def direct_ce(model64, rows) -> float:
    """Unbatched, unpadded float64 recomputation: -mean log p(token | prefix) over the counted tokens."""
    total, count = 0.0, 0
    for ids, start in rows:
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=x).logits[0].double(), -1)
        for j in range(start, len(ids)):
            total -= float(logp[j - 1, ids[j]])
            count += 1
    return total / count


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753279986), abs=1e-9)
    assert wilson_interval(5, 10) == pytest.approx((0.23659309, 0.76340691), abs=1e-7)
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    s = rate_summary([True, True, False, False])
    assert s["rate"] == 0.5 and s["k"] == 2 and s["n"] == 4


def test_by_category_and_agreement():
    cats = by_category([True, False, True], ["a", "b", "a"])
    assert cats["a"]["rate"] == 1.0 and cats["b"]["rate"] == 0.0
    assert by_category([True], [None]) == {}
    agree = agreement({"x": [True, False, True, True], "y": [True, True, True, True], "z": [True, False, True, True]})
    assert agree == {"x|y": 0.75, "x|z": 1.0, "y|z": 0.75, "all": 0.75}


@pytest.fixture(scope="module")
def tiny(llama):
    return llama, copy.deepcopy(llama).double()


def test_ce_losses_equal_direct_float64_recomputation(tiny, tokenizer):
    model, model64 = tiny
    fmt = ChatFormatter(tokenizer)
    comps = generate(
        model, tokenizer, [p for p, _ in PAIRS], settings=GenerationSettings(max_new_tokens=5), progress=False
    )
    for rows in (plain_text_rows(tokenizer, TEXTS), chat_rows(fmt, PAIRS), completion_rows(fmt, comps)):
        want = direct_ce(model64, rows)
        assert ce_loss(model64, rows, batch_size=2) == pytest.approx(want, rel=1e-10)  # same precision: exact
        assert ce_loss(model, rows, batch_size=2) == pytest.approx(want, rel=1e-5)  # float32 weights


def test_instruction_rows_count_reply_tokens_only(tokenizer):
    fmt = ChatFormatter(tokenizer)
    (ids, start), _ = chat_rows(fmt, PAIRS)
    prompt = tokenizer(fmt.format(PAIRS[0][0]), add_special_tokens=False)["input_ids"]
    reply = tokenizer(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    assert ids[:start] == prompt and ids[start : start + len(reply)] == reply
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids[start + len(reply) :]  # the turn's end is scored


def test_kl_zero_without_intervention_and_positive_with_ablation(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    prompts = [p for p, _ in PAIRS]
    r = torch.randn(32, generator=torch.Generator().manual_seed(0))
    comps = generate(llama, tokenizer, prompts, settings=GenerationSettings(max_new_tokens=5), progress=False)
    rows = completion_rows(fmt, comps)
    assert reply_kl(llama, rows, nullcontext)["mean"] == pytest.approx(0.0, abs=1e-12)
    kl = reply_kl(llama, rows, lambda: ablate_direction(llama, r), batch_size=1)
    assert kl["mean"] > 0 and kl["max"] >= kl["mean"]
    first = first_token_kl(llama, fmt, prompts, lambda: ablate_direction(llama, r))
    with ablate_direction(llama, r):
        other = last_logits(llama, fmt, prompts)
    assert first == pytest.approx(kl_divergence(last_logits(llama, fmt, prompts), other).tolist())
