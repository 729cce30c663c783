"""The fitted refusal score: the contrast formula, the barely-refuses verdict, and a fit on the organism."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.direction.refusal_fit import RefusalScore, barely_refuses, fit_refusal_score, is_refusal_reply
from refusal_lens.direction.scoring import refusal_score_from_logits


def test_contrast_and_paper_scores_against_a_float64_softmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), -1)
    contrast = RefusalScore("contrast", [3, 7], [1, 2, 9])(logits)
    assert torch.allclose(contrast, p[:, [3, 7]].sum(-1).log() - p[:, [1, 2, 9]].sum(-1).log(), atol=1e-12)
    paper = RefusalScore("paper", [3, 7], [1, 2, 9])(logits)
    assert torch.equal(paper, refusal_score_from_logits(logits, [3, 7]))


def test_barely_refuses_names_the_rates_and_the_remedies():
    rates = {"n_harmful": 32, "harmful_refused": 1, "n_harmless": 32, "harmless_refused": 0, "max_new_tokens": 16}
    line = barely_refuses(RefusalScore("paper", [1], rates=rates))
    assert "refused 1 of 32 harmful prompts (3%) and 0 of 32 harmless (0%)" in line
    assert "--system" in line and "smollm2-safe" in line and "\n" not in line
    assert barely_refuses(RefusalScore("paper", [1], rates={**rates, "harmful_refused": 20})) is None
    both = {**rates, "harmful_refused": 20, "harmless_refused": 19}  # refuses everything alike: no contrast
    assert barely_refuses(RefusalScore("paper", [1], rates=both)) is not None


def test_extra_phrases():
    assert is_refusal_reply("Sorry, but I won\u2019t help with that.") and not is_refusal_reply("Sure, here it is.")


def test_fit_on_the_organism_finds_its_refusals():
    from refusal_lens import organism
    from refusal_lens.core.models import load_model
    from refusal_lens.core.prompts import ChatFormatter

    try:
        organism.path()
    except UserError as exc:
        pytest.skip(f"no organism checkpoint: {exc}")
    model, tok = load_model()
    harmful = [p.instruction for p in organism.load_prompts("organism:harmful:val")][:16]
    harmless = [p.instruction for p in organism.load_prompts("organism:harmless:val")][:16]
    score = fit_refusal_score(model, ChatFormatter(tok), harmful, harmless, n=16)
    assert score.method == "paper" and "auto -> paper" in score.why
    assert score.rates["harmful_refused"] >= 12 and score.rates["harmless_refused"] <= 2
    assert any(o.startswith("I'm sorry") for o in score.openings) and barely_refuses(score) is None
    assert score.rates["agreement_with_replies"]["paper"] >= 0.9
    with pytest.raises(UserError, match="--refusal-score 'bogus'"):
        fit_refusal_score(model, ChatFormatter(tok), harmful, harmless, method="bogus")
