"""The capability check without lm-eval installed: the cloze task file, the CE loss, the errors, the CLI.

The lm-eval runs themselves are in tests/evaluation/test_lm_eval.py (skipped when lm-eval is absent).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.evaluation import capability as cap
from refusal_lens.testing import random_model

from ..cli.console import run_cli

TEXTS = [f"passage {i} says that the river number {i} runs past mill {i} and on to the sea" for i in range(10)]


def test_cloze_items_hold_the_true_continuation_at_the_label(tmp_path):
    path = cap.write_cloze_task(TEXTS, tmp_path, "my_cloze", n=6, seed=1)
    assert path.name == "my_cloze.yaml" and "task: my_cloze" in path.read_text()
    rows = [json.loads(line) for line in (tmp_path / "my_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        source = next(t for t in TEXTS if t.startswith(row["context"] + " "))  # the passage it was cut from
        assert source == row["context"] + row["choices"][row["label"]]
        assert len(set(row["choices"])) == 4
    assert (
        cap.write_cloze_task(TEXTS, tmp_path / "again", "my_cloze", n=6, seed=1).read_text().replace("again/", "")
        == path.read_text()
    )  # seeded
    with pytest.raises(UserError, match="at least 4 texts"):
        cap.write_cloze_task(["too short"] * 9, tmp_path)
    with pytest.raises(UserError, match="different endings"):  # a true ending among its distractors is no test
        cap.write_cloze_task(["one two three four five six seven eight"] * 9, tmp_path)


def test_plain_text_ce_equals_the_models_own_loss(tokenizer):
    model = random_model("llama", n_layers=2)
    text = TEXTS[0]
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        reference = float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert cap.plain_text_ce(model, tokenizer, [text]) == pytest.approx(reference, rel=1e-5)


def test_task_files_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="missing.yaml does not exist"):
        cap.check_tasks(cap.CapabilityConfig(lm_eval=str(tmp_path / "missing.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(UserError, match="has no 'task: NAME'"):
        cap.check_tasks(cap.CapabilityConfig(lm_eval=str(bad)))
    good = tmp_path / "good.yaml"
    good.write_text("task: mine\n!function tags: stay text\n")
    assert cap._task_names([str(good), "hellaswag"]) == (["mine", "hellaswag"], [str(tmp_path.resolve())], True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real_find_spec(n, *a))
    with pytest.raises(UserError, match=r"pip install -e \"\.\[eval\]\""):
        cap.check_tasks(cap.CapabilityConfig(lm_eval_cloze=5))
    cap.check_tasks(cap.CapabilityConfig())  # CE loss only: no lm-eval needed


def test_side_by_side_table_lists_every_measure():
    lines = cap.side_by_side({
        "original": {"ce_loss_plain_text": 2.5, "lm_eval": {"t": {"acc": 0.5, "acc_norm": 0.25}}},
        "edited": {"ce_loss_plain_text": 2.75, "lm_eval": {"t": {"acc": 0.75}}},
    })  # fmt: skip
    assert lines[0].split() == ["original", "edited"]
    assert lines[1].split()[-2:] == ["2.5", "2.75"] and lines[2].split()[-2:] == ["0.5", "0.75"]
    assert lines[3].split()[-2:] == ["0.25", "-"]


def test_console_script_measures_the_ce_loss_beside_a_baseline(saved_model, tmp_path):
    (tmp_path / "text.json").write_text(json.dumps(TEXTS))
    other = random_model("llama", n_layers=4, d_model=32, seed=5)
    other.save_pretrained(tmp_path / "other")
    run = run_cli("capability", "--model", str(saved_model), "--baseline", str(saved_model), "--plain-text",
                  "text.json", "--json", cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["model"]["lm_eval"] is None and out["model"]["n_plain_texts"] == 10
    assert out["model"]["ce_loss_plain_text"] == out["baseline"]["ce_loss_plain_text"] > 0  # the same model
