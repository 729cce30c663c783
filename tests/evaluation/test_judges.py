"""Judges: substring/prefix lists, the logit judge, and model judges (chat and classifier) built here."""

from __future__ import annotations

import json
import random

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.scoring import last_logits, refusal_score_from_logits
from refusal_lens.evaluation.judges import (
    JUDGE_QUESTION,
    Judge,
    LogitJudge,
    ModelJudge,
    PrefixJudge,
    SubstringJudge,
    load_model_judge,
)
from refusal_lens.testing import random_model, toy_tokenizer

REFUSALS = ["i am sorry , i cannot help", "as an ai i can not assist", "i cannot help with that request"]
ANSWERS = ["sure , here is a short story", "here is a poem about the sea", "plants grow with water"]


def train_judge_model(steps: int = 60, seed: int = 0):
    """A tiny chat model trained for a few steps to answer "yes" iff the reply contains "sorry"/"cannot"."""
    tok = toy_tokenizer()
    torch.manual_seed(seed)
    model = random_model("llama", n_layers=1, d_model=32, bias=False, seed=seed)
    model.train().requires_grad_(True)
    yes = tok("yes", add_special_tokens=False)["input_ids"][0]
    no = tok("no", add_special_tokens=False)["input_ids"][0]
    rng = random.Random(seed)
    examples = [(r, yes) for r in REFUSALS] + [(a, no) for a in ANSWERS]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = [rng.choice(examples) for _ in range(8)]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": JUDGE_QUESTION.format(prompt="do it", completion=c)}],
                tokenize=False,
                add_generation_prompt=True,
            )  # fmt: skip
            for c, _ in batch
        ]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        logits = model(**enc, position_ids=pos).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([t for _, t in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, tok


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    model, tok = train_judge_model()
    path = tmp_path_factory.mktemp("judge") / "tiny-judge"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_substring_judge_paper_list_curly_apostrophes_and_custom_list():
    j = SubstringJudge()
    assert isinstance(j, Judge)
    assert j.judge(["q"] * 4, ["I\u2019m sorry.", "i CANNOT do that", "Sure, here it is.", "As an AI model"]) == [
        True, True, False, True,
    ]  # fmt: skip
    assert SubstringJudge(substrings=("nope",)).judge(["q", "q"], ["Nope.", "I cannot"]) == [True, False]


def test_prefix_judge_looks_at_the_start_only():
    j = PrefixJudge()
    assert j.judge(["q"] * 3, ["  I can\u2019t help.", "Sure. Later: I cannot.", '"Sorry, no."']) == [True, False, True]


def test_logit_judge_matches_the_refusal_score(tokenizer, llama):
    fmt = ChatFormatter(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids("i")]
    prompts = ["how do i bake bread", "write a poem"]
    scores = refusal_score_from_logits(last_logits(llama, fmt, prompts), ids)
    j = LogitJudge(llama, fmt, ids, threshold=float(scores.min()))
    assert j.judge(prompts, ["", ""]) == [bool(s > scores.min()) for s in scores]
    assert j.scores == pytest.approx(scores.tolist())


def test_chat_model_judge_answers_yes_for_refusals(judge_dir):
    judge = load_model_judge(judge_dir)
    assert judge.mode == "chat" and judge.kind == "refusal" and judge.name == "model:tiny-judge"
    got = judge.judge(["do it"] * 6, REFUSALS + ANSWERS)
    assert got == [True] * 3 + [False] * 3
    # Reading the generated answer instead of comparing logits gives the same verdicts.
    reader = ModelJudge(judge.model, judge.tokenizer, method="generate", answers=("y", "no"))
    assert reader.judge(["do it"] * 6, REFUSALS + ANSWERS) == got


def test_classifier_judge_uses_the_refusal_label(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = toy_tokenizer()
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, id2label={0: "complied", 1: "refusal"},
        label2id={"complied": 0, "refusal": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    judge = load_model_judge(tmp_path / "clf")
    assert judge.mode == "classifier"
    prompts, replies = ["q1", "q2", "q3"], ["i am sorry", "sure , here", "plants grow"]
    enc = tok(prompts, replies, padding=True, return_tensors="pt")
    want = (model(**enc).logits.argmax(-1) == 1).tolist()
    assert judge.judge(prompts, replies) == want
    safety = ModelJudge(judge.model, judge.tokenizer, mode="classifier", kind="safety", label="refusal")
    assert safety.judge(prompts, replies) == [not w for w in want]


def test_unreadable_judge_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="judge model"):
        load_model_judge(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(UserError, match="could not be loaded"):
        load_model_judge(tmp_path / "bad")
