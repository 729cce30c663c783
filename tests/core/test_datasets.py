"""The standard refusal benchmarks load as they are (../shared; skipped when absent), deterministically."""

from __future__ import annotations

import json

import pytest

from refusal_lens.core.data import load_prompts
from refusal_lens.core.errors import UserError

from ..conftest import shared_data_or_skip

# file (relative to ../shared/datasets/refusal_direction), expected first instruction prefix, has categories
BENCHMARKS = [
    ("processed/jailbreakbench.json", "Write a defamatory article", True),
    ("processed/alpaca.json", "Give three tips for staying healthy", False),
    ("raw/advbench.csv", "Write a script that can exploit", False),  # column `goal`
    ("raw/harmbench_test.csv", "Write a persuasive article arguing that the Korean War", True),  # `Behavior`
    ("raw/jailbreakbench.csv", "Write a defamatory article", True),  # `Goal` (beside a `Behavior` label column)
    ("raw/strongreject.csv", "Can you explain how to write a deceptive email", True),  # `forbidden_prompt`
    ("splits/harmful_test.json", "Write a defamatory article", True),
]


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "first", "has_category"), BENCHMARKS)
def test_benchmark_files_just_work(name, first, has_category):
    path = shared_data_or_skip() / name
    if not path.is_file():
        pytest.skip(f"{path} is absent from this copy of ../shared")
    prompts = load_prompts(path)
    assert len(prompts) > 10 and prompts[0].instruction.startswith(first)
    assert (prompts[0].category is not None) == has_category


@pytest.mark.shared_data
def test_sampling_is_deterministic():
    path = shared_data_or_skip() / "processed" / "jailbreakbench.json"
    a, b = load_prompts(path, n=10, seed=1), load_prompts(path, n=10, seed=1)
    assert a == b and a != load_prompts(path, n=10, seed=2)
    full = load_prompts(path)
    assert [full.index(p) for p in a] == sorted(full.index(p) for p in a)  # original order kept


def test_unknown_column_and_empty_file_are_user_errors(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps([{"question": "how?"}]))
    with pytest.raises(UserError, match="no column"):
        load_prompts(f)
    with pytest.raises(UserError, match="no column 'nope'"):
        load_prompts(f, column="nope")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="holds no instructions"):
        load_prompts(empty)


@pytest.mark.shared_data
def test_evaluate_cli_takes_benchmark_files(saved_model, tmp_path):
    import torch

    from refusal_lens.cli.main import main

    root = shared_data_or_skip()
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread avoids contention on a loaded machine
    try:
        rc = main([
            "evaluate", "--model", str(saved_model), "--harmful", str(root / "processed" / "jailbreakbench.json"),
            "--harmless", str(root / "processed" / "alpaca.json"),
            "--borderline", str(root / "raw" / "strongreject.csv"),
            "--n-prompts", "3", "--max-new-tokens", "3", "--refusal-tokens", "i", "--no-report", "--quiet",
            "--out", str(tmp_path / "out"),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["prompt_sets"] == {"harmful": {"n": 3}, "harmless": {"n": 3}, "borderline": {"n": 3}}
    assert results["conditions"]["baseline"]["harmful"]["by_category"]  # JBB categories carried through
