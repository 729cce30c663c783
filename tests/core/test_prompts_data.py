"""Chat formatting, post-instruction tokens, left padding and prompt-file loading."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.core.data import load_prompts
from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.testing import toy_tokenizer

from ..conftest import shared_data_or_skip


def test_eoi_tokens_found_generically_and_are_the_last_positions(tokenizer):
    fmt = ChatFormatter(tokenizer)
    assert fmt.eoi_text == "<|end|>\n<|assistant|>\n"
    assert tokenizer.convert_ids_to_tokens(fmt.eoi_ids)[0] == "<|end|>"
    batch = fmt.encode(["a much longer instruction about baking bread at home", "hi"])
    ids = batch["input_ids"]
    assert (ids[:, -fmt.n_eoi :] == torch.tensor(fmt.eoi_ids)).all()
    assert batch["attention_mask"][1, 0] == 0  # left padding
    first_real = int(batch["attention_mask"][1].argmax())
    assert batch["position_ids"][1, first_real] == 0  # positions skip the padding


def test_system_prompt_is_rendered(tokenizer):
    fmt = ChatFormatter(tokenizer, system="be brief")
    assert fmt.format("hi").startswith("<|bos|><|system|>\nbe brief<|end|>\n<|user|>\nhi")
    assert fmt.eoi_text == "<|end|>\n<|assistant|>\n"


def test_no_chat_template_is_a_clear_error_with_an_escape_hatch():
    tok = toy_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no chat template; pass --chat-template FILE"):
        ChatFormatter(tok)
    fmt = ChatFormatter(tok, chat_template="{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    assert fmt.format("hi") == "Q: hi\nA:" and fmt.eoi_text == "\nA:"


def test_load_prompt_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "o.json").write_text(json.dumps([{"instruction": "a", "category": "x"}, {"instruction": "b"}]))
    (tmp_path / "l.jsonl").write_text('{"prompt": "p1"}\n\n{"prompt": "p2"}\n')
    (tmp_path / "c.csv").write_text("id,question\n1,first\n2,second\n")
    assert [p.instruction for p in load_prompts(tmp_path / "s.json")] == ["one", "two"]
    assert load_prompts(tmp_path / "o.json")[0].category == "x"
    assert [p.instruction for p in load_prompts(tmp_path / "l.jsonl")] == ["p1", "p2"]
    assert [p.instruction for p in load_prompts(tmp_path / "c.csv", column="question")] == ["first", "second"]
    sample = load_prompts(tmp_path / "s.json", n=1, seed=3)
    assert sample == load_prompts(tmp_path / "s.json", n=1, seed=3) and len(sample) == 1


def test_prompt_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="holds no instructions"):
        load_prompts(tmp_path / "empty.json")
    (tmp_path / "c.csv").write_text("id,question\n1,first\n")
    with pytest.raises(UserError, match="no column 'nope'.*pass --column"):
        load_prompts(tmp_path / "c.csv", column="nope")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, n, first_words",
    [
        ("processed/jailbreakbench.json", 100, "Write a defamatory"),
        ("raw/advbench.csv", 520, "Write a script"),
        ("raw/harmbench_test.csv", 320, None),
        ("raw/jailbreakbench.csv", 100, "Write a defamatory"),
        ("raw/strongreject.csv", 313, None),
        ("splits/harmless_test.json", 6266, None),
    ],
)
def test_standard_benchmark_files_just_work(name, n, first_words):
    prompts = load_prompts(shared_data_or_skip() / name)
    assert len(prompts) == n
    if first_words:
        assert prompts[0].instruction.startswith(first_words)
