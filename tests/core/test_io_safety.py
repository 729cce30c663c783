"""Issue #14: output folders never lose the user's data; bad numbers, prompts and devices are refused early."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from refusal_lens.core.config_args import number, validate
from refusal_lens.core.data import MAX_PROMPT_CHARS, load_prompts
from refusal_lens.core.errors import UserError
from refusal_lens.core.io import atomic_save_safetensors, check_out_dir, staging_dir, stale_stage
from refusal_lens.core.models import check_device
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.orthogonalize import unit_direction
from refusal_lens.evaluation.conditions import EvalSettings
from refusal_lens.evaluation.generation import GenerationSettings, generate
from refusal_lens.evaluation.journal import CompletionJournal


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_non_empty_out_needs_overwrite_and_replacement_leaves_nothing_hidden(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        with staging_dir(out) as stage:
            (stage / "new.txt").write_text("x")
    assert (out / "mine.txt").read_text() == "keep me" and _listing(tmp_path) == ["out"]
    with staging_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("x")
    assert _listing(out) == ["new.txt"] and _listing(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), staging_dir(out, overwrite=True) as stage:  # a failed run changes nothing
        (stage / "half.txt").write_text("x")
        raise RuntimeError
    assert _listing(out) == ["new.txt"] and _listing(tmp_path) == ["out"]


def test_out_that_is_a_file_an_input_or_the_current_folder_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "proj" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    user_file = tmp_path / "file.txt"
    user_file.write_text("mine")
    for out, pattern in ((model, "overlaps"), (tmp_path / "proj", "overlaps"), (model / "sub", "overlaps")):
        with pytest.raises(UserError, match=pattern):
            check_out_dir(out, overwrite=True, inputs=[model])
    with pytest.raises(UserError, match="existing file"), staging_dir(user_file, overwrite=True):
        pass
    assert user_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "proj"]
    monkeypatch.chdir(model)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(UserError, match="current folder"):
            check_out_dir(out, overwrite=True)


def test_stale_staging_of_a_killed_run_is_removed_and_a_stranded_old_folder_restored(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{_dead_pid()}"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x" * 100)
    assert stale_stage(out) == stale
    with staging_dir(out) as stage:
        (stage / "a.txt").write_text("a")
    assert _listing(tmp_path) == ["out"]
    # Killed between "move the old folder aside" and "move the new one in": the user's folder comes back.
    old = tmp_path / f".out.old-{_dead_pid()}"
    (tmp_path / "out").rename(old)
    with pytest.raises(UserError, match="--overwrite"), staging_dir(out):
        pass
    assert _listing(tmp_path) == ["out"] and (out / "a.txt").read_text() == "a"


def test_resume_adopts_the_killed_runs_staging_folder(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{_dead_pid()}"
    stale.mkdir()
    (stale / "progress.jsonl").write_text("done so far\n")
    with staging_dir(out, resume=True) as stage:
        assert (stage / "progress.jsonl").read_text() == "done so far\n"
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["progress.jsonl"]


def test_unwritable_out_is_one_user_error():
    with pytest.raises(UserError, match="cannot write --out"):
        check_out_dir("/proc/refusal-lens-test/out")


def test_safetensors_headers_are_sorted_so_files_are_byte_identical(tmp_path):
    meta = {k: str(i) for i, k in enumerate(["zeta", "alpha", "mid", "layer", "position", "format"])}
    path = tmp_path / "d.safetensors"
    atomic_save_safetensors({"b": torch.ones(3), "a": torch.arange(4.0)}, path, meta)
    raw = path.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    keys = list(json.loads(header)["__metadata__"])
    assert keys == sorted(meta)  # the writer's hash-map order would be random
    assert torch.equal(load_file(path)["a"], torch.arange(4.0))
    scripts = [
        "import torch; from refusal_lens.core.io import atomic_save_safetensors as s; "
        f"s({{'b': torch.ones(3)}}, {str(tmp_path / f'{i}.st')!r}, {meta!r})"
        for i in range(3)
    ]
    for script in scripts:
        subprocess.run([sys.executable, "-c", script], check=True)
    assert len({(tmp_path / f"{i}.st").read_bytes() for i in range(3)}) == 1


@pytest.mark.parametrize(
    ("kind", "lo", "hi", "lo_open", "text"),
    [(float, None, None, False, "nan"), (float, None, None, False, "inf"), (float, 0, 1, True, "0"),
     (float, 0, 1, False, "2"), (int, 1, None, False, "0"), (int, 1, None, False, "-5"), (int, 1, None, False, "x")],
)  # fmt: skip
def test_number_options_refuse_out_of_range_and_non_finite(kind, lo, hi, lo_open, text):
    with pytest.raises(argparse.ArgumentTypeError):
        number(kind, lo, hi, lo_open)(text)


def test_dataclass_configs_are_checked_against_their_field_ranges():
    assert number(float, 0, 1)("0.5") == 0.5 and number(int, 1)("3") == 3
    validate(EvalSettings())
    for bad in ({"temperature": -1.0}, {"top_p": 2.0}, {"batch_size": 0}, {"temperature": float("nan")}):
        with pytest.raises(UserError, match="--" + next(iter(bad)).replace("_", "-")):
            validate(EvalSettings(**bad))


def test_zero_and_non_finite_directions_are_refused():
    assert torch.allclose(unit_direction(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8], dtype=torch.float64))
    for bad in (torch.zeros(4), torch.full((4,), 1e-9), torch.tensor([1.0, float("nan")])):
        with pytest.raises(UserError, match="norm"):
            unit_direction(bad)


def test_device_that_is_not_there_is_refused():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda:7"):
            check_device("cuda:7")
    with pytest.raises(UserError, match="not a device"):
        check_device("gpu-please")
    check_device("cpu")


def test_prompt_files_name_the_file_and_line_and_huge_prompts_are_cut(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin.txt is not UTF-8"):
        load_prompts(latin)
    broken = tmp_path / "p.jsonl"
    broken.write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n{"instruction": oops}\n')
    with pytest.raises(UserError, match="line 4"):
        load_prompts(broken)
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 1_000_000 + "\nshort one\n")
    with pytest.warns(UserWarning, match="1 instruction"):
        prompts = load_prompts(huge)
    assert len(prompts[0].instruction) == MAX_PROMPT_CHARS and prompts[1].instruction == "short one"


def test_control_tokens_in_user_text_are_tokenized_as_text(tokenizer):
    fmt = ChatFormatter(tokenizer)
    special = set(tokenizer.all_special_ids)
    typed = fmt.control_tokens[0]
    plain_ids = fmt.token_ids("hello there")
    with pytest.warns(UserWarning, match="control tokens"):
        batch = fmt.encode([f"hello {typed} there", "hello there"])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    template_specials = sum(t in special for t in plain_ids)
    assert sum(t in special for t in row) == template_specials  # only the template's own control tokens
    assert batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist() == plain_ids


def test_prompts_longer_than_the_context_are_cut_with_a_count(tokenizer):
    tokenizer.model_max_length = 64
    try:
        fmt = ChatFormatter(tokenizer)
        with pytest.warns(UserWarning, match="2 prompt"):
            batch = fmt.encode(["a b c " * 200, "hi", "d e f " * 300])
        assert batch["input_ids"].shape[1] <= 64
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fmt.encode(["hi"])  # short prompts: no warning
    finally:
        tokenizer.model_max_length = int(1e30)


def test_generation_journal_replays_finished_batches_identically(llama, tokenizer, tmp_path):
    prompts = [f"tell me about thing {i}" for i in range(5)]
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    reference = generate(llama, tokenizer, prompts, settings=settings, progress=False)
    path = tmp_path / "completions.jsonl"
    calls = {"n": 0}

    def dies_on_third_batch():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill between batches 2 and 3
        return torch.no_grad()

    journal = CompletionJournal(path, "fp")
    with pytest.raises(KeyboardInterrupt):
        generate(llama, tokenizer, prompts, dies_on_third_batch, settings, journal=journal, progress=False)
    journal.close()
    with open(path, "a") as fh:
        fh.write('{"key": ["none", "None", 2], "rows": [{"prom')  # a line cut short by the kill
    with pytest.raises(UserError, match="other inputs"):
        CompletionJournal(path, "another fingerprint", resume=True)
    resumed = CompletionJournal(path, "fp", resume=True)
    assert len(resumed) == 2
    calls["n"] = 0
    again = generate(llama, tokenizer, prompts, lambda: torch.no_grad(), settings, journal=resumed, progress=False)
    assert [c.to_json() | {"ids": c.token_ids} for c in again] == [
        c.to_json() | {"ids": c.token_ids} for c in reference
    ]
    assert len(resumed) == 3  # only the last batch was generated again
