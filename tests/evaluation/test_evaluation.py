"""evaluate_conditions and `refusal-lens evaluate`: schema, determinism, weight restore, bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from refusal_lens.cli.main import main
from refusal_lens.core.data import Prompt
from refusal_lens.direction.compute import Direction
from refusal_lens.direction.orthogonalize import orthogonalize_model
from refusal_lens.evaluation.conditions import (
    SCHEMA_VERSION,
    EvalSettings,
    OrthogonalizedWeights,
    evaluate_conditions,
    orthogonalized_weights,
    standard_conditions,
)
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS
from .test_judges import train_judge_model

FAST = EvalSettings(max_new_tokens=6, batch_size=4, n_ce=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    model = random_model("llama", n_layers=4, d_model=32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), 2, -1).save(root / "dir")
    Direction(torch.randn(16), 2, -1).save(root / "wrong_dir")
    cats = ["weapons", "crime", "crime"]
    (root / "harmful.json").write_text(json.dumps([{"goal": h, "category": c} for h, c in zip(HARMFUL, cats)]))
    (root / "harmless.jsonl").write_text("\n".join(json.dumps({"instruction": h}) for h in HARMLESS[:3]))
    (root / "empty.json").write_text("[]")
    (root / "bad_judge").mkdir()
    (root / "bad_judge" / "config.json").write_text("{not json")
    judge, jtok = train_judge_model(steps=10)
    judge.save_pretrained(root / "judge")
    jtok.save_pretrained(root / "judge")
    return root


def cli(files, out, *extra):
    return main([
        "evaluate", "--model", str(files / "model"), "--harmful", str(files / "harmful.json"),
        "--harmless", str(files / "harmless.jsonl"), "--max-new-tokens", "6", "--batch-size", "4", "--n-ce", "4",
        "--refusal-tokens", "i", "--quiet", "--out", str(out), *extra,
    ])  # fmt: skip


def test_evaluate_conditions_library(llama, tokenizer):
    direction = Direction(torch.randn(32, generator=torch.Generator().manual_seed(1)), 2, -1)
    conditions, info = standard_conditions(llama, direction, coeff=2.0, positions="prompt")
    sets = {
        "harmful": [Prompt(h, "c1" if i % 2 else "c2") for i, h in enumerate(HARMFUL[:3])],
        "harmless": HARMLESS[:3],
    }
    results, comps = evaluate_conditions(
        llama, tokenizer, conditions, sets, FAST, refusal_tokens=[5], plain_text=["how do i bake bread at home ."],
        instruction_pairs=[("write a poem", "sure , here is a poem .")], direction=direction, descriptions=info,
        progress=False, return_completions=True,
    )  # fmt: skip
    assert results["schema_version"] == SCHEMA_VERSION
    assert results["direction"]["layer"] == 2 and results["direction"]["position"] == -1
    assert list(results["conditions"]) == ["baseline", "ablation", "addition", "orthogonalized"]
    base, abl, orth = (results["conditions"][k] for k in ("baseline", "ablation", "orthogonalized"))
    h = base["harmful"]
    assert h["n"] == 3 and 0 <= h["refusal_rate"] <= 1 and len(h["ci95"]) == 2
    assert set(h["judges"]) == {"substring", "prefix", "logit"} and "all" in h["agreement"]
    assert set(h["by_category"]) == {"c1", "c2"} and "mean_refusal_score" in h
    assert base["kl_harmless"] == 0.0 and abl["kl_harmless"] > 0
    # Weight orthogonalization is equivalent to hook ablation (paper App. E).
    assert orth["kl_harmless"] == pytest.approx(abl["kl_harmless"], rel=1e-3)
    assert set(base["ce_loss"]) == {"plain_text", "instruction", "own_completions"}
    assert all(v is not None for v in base["ce_loss"].values())
    assert results["conditions"]["addition"]["description"]["coeff"] == 2.0
    assert len(comps) == 4 * 6 and set(comps[0].judgements) == {"substring", "prefix", "logit"}


@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalized_weights_are_restored_exactly(tied):
    model = random_model("llama", n_layers=2, d_model=32, tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = torch.randn(32)
    with orthogonalized_weights(model, r):
        emb = model.get_input_embeddings().weight
        assert torch.allclose(
            emb.double() @ (r.double() / r.norm()), torch.zeros(emb.shape[0], dtype=torch.double), atol=1e-5
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    # Same model as orthogonalize_model's permanent edit, also when entered repeatedly.
    edited = copy.deepcopy(model)
    orthogonalize_model(edited, r)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    factory = OrthogonalizedWeights(model, r)
    for _ in range(2):
        with factory():
            assert torch.allclose(model(input_ids=ids).logits, edited(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_cli_rerun_gives_identical_results_json(files, tmp_path):
    extra = ("--direction", str(files / "dir"), "--judge-model", str(files / "judge"))
    assert cli(files, tmp_path / "a", *extra) == 0
    assert cli(files, tmp_path / "b", *extra, "--no-report") == 0  # the report does not feed results.json
    a, b = (tmp_path / "a" / "results.json").read_bytes(), (tmp_path / "b" / "results.json").read_bytes()
    assert a == b
    results = json.loads(a)
    assert "model:judge" in results["conditions"]["ablation"]["harmful"]["judges"]
    assert results["conditions"]["baseline"]["harmful"]["by_category"]  # categories from the file
    for name in ("completions.jsonl", "provenance.json", "report.html", "direction.json", "figures/refusal_rates.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert "created" not in results and "created" in json.loads((tmp_path / "a" / "provenance.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--column", "nope"), "no column 'nope'"),
        (("--harmless", "{root}/empty.json"), "holds no instructions"),
        (("--judge-model", "{root}/bad_judge"), "judge model"),
        (("--judge-model", "{root}/missing"), "judge model"),
        (("--direction", "{root}/wrong_dir"), "width 16"),
        (("--intervention", "ablate"), "needs --direction"),
    ],
)
def test_bad_inputs_fail_cleanly(files, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = cli(files, out, *(a.format(root=files) for a in args))
    # transformers may draw a "Loading weights" bar before the check fails; the error itself is one line.
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert rc == 2
    assert len(errors) == 1 and message in errors[0] and errors[0].startswith("refusal-lens evaluate: error:")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
