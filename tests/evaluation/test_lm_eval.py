"""The lm-evaluation-harness hook, on a local multiple-choice task written here (no hub).

lm-eval is optional (``pip install -e ".[eval]"``); these tests skip with the reason when it is absent. CI runs
them in a side environment with torch/transformers pinned (see .ci/run). The reference is our own scoring of
the same items: the summed log-probability of each choice after its context, argmax against the label.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refusal_lens.evaluation.capability import CapabilityConfig, capability, lm_eval_scores
from refusal_lens.testing import random_model

SRC = str(Path(__file__).resolve().parents[2] / "src")
ITEMS = [
    ("the cat sat on the", [" mat", " sea", " bread tonight", " two"], 0),
    ("write a poem about", [" the sea", " a cat", " steps", " how"], 1),
    ("how do i bake", [" bread at home", " a poem", " the", " plants grow"], 0),
    ("tell me a story about", [" a dog", " a cat", " two plus two", " travel"], 3),
    ("explain how plants", [" grow", " bake", " the cat", " at home"], 2),
    ("what is two plus", [" two", " three", " the sea", " a story"], 1),
]


def _write_task(folder: Path, name: str = "tiny_mc") -> Path:
    data = folder / "items.json"
    data.write_text(json.dumps([{"q": q, "choices": c, "label": y} for q, c, y in ITEMS]))
    path = folder / f"{name}.yaml"
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return path


@torch.no_grad()
def _reference_accuracy(model, tok) -> tuple[float, float]:
    """acc (summed log-prob) and acc_norm (per byte of the choice) computed directly."""
    hits = hits_norm = 0
    for context, choices, label in ITEMS:
        scores = []
        for choice in choices:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        hits += max(range(4), key=lambda i: scores[i]) == label
        hits_norm += max(range(4), key=lambda i: scores[i] / len(choices[i].encode())) == label
    return hits / len(ITEMS), hits_norm / len(ITEMS)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')
    return random_model("llama", n_layers=2, seed=3), tokenizer


def test_local_yaml_task_scores_equal_a_direct_log_likelihood_reference(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    scores = lm_eval_scores(model, tok, [str(_write_task(tmp_path))], batch_size=4)
    acc, acc_norm = _reference_accuracy(model, tok)
    assert scores["tiny_mc"]["n"] == len(ITEMS)
    assert scores["tiny_mc"]["acc"] == pytest.approx(acc) and scores["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)
    assert tok.padding_side == "left"  # restored for refusal-lens


def test_cloze_task_from_plain_text_and_ce_loss_run_together(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    texts = [f"the cat sat on the mat and then wrote poem number {i} about the sea at home" for i in range(12)]
    out = capability(model, tok, CapabilityConfig(lm_eval_cloze=8, n_ce=5), texts, tmp_path)
    cloze = out["lm_eval"]["refusal_lens_cloze"]
    assert cloze["n"] == 8 and 0 <= cloze["acc"] <= 1
    assert out["n_plain_texts"] == 5 and out["ce_loss_plain_text"] > 0


def test_abliterate_reports_capability_of_the_original_and_of_the_saved_model(saved_model, tmp_path):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..conftest import HARMFUL, HARMLESS

    (tmp_path / "harmful.json").write_text(json.dumps(HARMFUL * 2))
    (tmp_path / "harmless.json").write_text(json.dumps(HARMLESS * 2))
    (tmp_path / "text.json").write_text(json.dumps([f"{h} and then {b}" for h, b in zip(HARMFUL, HARMLESS)] * 2))
    task = _write_task(tmp_path)
    args = ["abliterate", "--model", str(saved_model), "--harmful", "harmful.json", "--harmless", "harmless.json",
            "--out", "abl", "--refusal-tokens", "5,6", "--max-kl", "100", "--max-evaluations", "6", "--n-search", "4",
            "--check-points", "1", "--check-tokens", "3", "--no-progress", "--json", "--lm-eval", str(task),
            "--plain-text", "text.json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "import sys; from refusal_lens.cli.main import main; sys.exit(main())", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cap = json.loads(run.stdout)["capability"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "abl").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "abl")
    original = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    for key, model in (("original", original), ("edited", saved)):
        acc, acc_norm = _reference_accuracy(model, tok)
        assert cap[key]["lm_eval"]["tiny_mc"]["acc"] == pytest.approx(acc), key
        assert cap[key]["lm_eval"]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm), key
        assert cap[key]["n_plain_texts"] == 12
    assert cap["edited"]["ce_loss_plain_text"] != cap["original"]["ce_loss_plain_text"]
    assert "lm-eval tiny_mc acc" in (tmp_path / "abl" / "README.md").read_text()
