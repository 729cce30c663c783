"""Generation: delayed refusals need the 128-token default, determinism, end-of-turn stops, JSONL round trip."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from refusal_lens.core.data import Prompt
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.evaluation.generation import (
    GenerationSettings,
    end_of_turn_ids,
    generate,
    load_completions,
    save_completions,
)
from refusal_lens.evaluation.judges import SubstringJudge


class ScriptedLM(nn.Module):
    """A stand-in chat model whose every reply is the same fixed token sequence (truncated like HF generate)."""

    def __init__(self, script: list[int], eos: int, pad: int):
        super().__init__()
        self.script, self.eos, self.pad = script, eos, pad
        self.embed = nn.Embedding(8, 4)
        self.config = type("Cfg", (), {"_name_or_path": "scripted"})()
        self.generation_config = None
        self.calls: list[int] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        self.calls.append(max_new_tokens)
        new = self.script[:max_new_tokens]
        row = torch.tensor(new, dtype=torch.long)
        return torch.cat([input_ids, row.expand(input_ids.shape[0], -1)], dim=1)


def delayed_refusal_script(tokenizer) -> list[int]:
    filler = tokenizer(" sure , here is a short story .", add_special_tokens=False)["input_ids"]
    script = (filler * 10)[:60]  # 60 tokens of compliance first...
    script += tokenizer(" i am sorry , but i cannot help with that request .", add_special_tokens=False)["input_ids"]
    return script + [tokenizer.eos_token_id]  # ...then the refusal, then the end of the turn


def test_default_window_catches_a_delayed_refusal_and_32_tokens_miss_it(tokenizer):
    script = delayed_refusal_script(tokenizer)
    assert 60 < len(script) <= 128
    model = ScriptedLM(script, tokenizer.eos_token_id, tokenizer.pad_token_id)
    judge = SubstringJudge()
    long = generate(model, tokenizer, ["tell me a story"], progress=False)
    short = generate(
        model, tokenizer, ["tell me a story"], settings=GenerationSettings(max_new_tokens=32), progress=False
    )
    assert GenerationSettings().max_new_tokens == 128 and model.calls == [128, 32]
    assert judge.judge(["q"], [long[0].completion]) == [True]
    assert judge.judge(["q"], [short[0].completion]) == [False]
    assert long[0].finished and not short[0].finished
    assert long[0].n_tokens == len(script) and short[0].n_tokens == 32


def test_end_of_turn_includes_template_end_token(tokenizer, llama):
    fmt = ChatFormatter(tokenizer)
    ids = end_of_turn_ids(tokenizer, fmt, llama)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids


def test_generation_is_deterministic_and_batch_independent(tokenizer, llama):
    prompts = [Prompt("how do i bake bread", "food"), "write a poem about the sea", "what is two plus two"]
    greedy = GenerationSettings(max_new_tokens=6, batch_size=2)
    a = generate(llama, tokenizer, prompts, settings=greedy, progress=False)
    b = generate(llama, tokenizer, prompts, settings=greedy, progress=False)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].category == "food" and a[1].category is None
    sampled = GenerationSettings(max_new_tokens=6, batch_size=2, do_sample=True, seed=7)
    torch.manual_seed(123)
    s1 = generate(llama, tokenizer, prompts, settings=sampled, progress=False)
    state = torch.random.get_rng_state()
    s2 = generate(llama, tokenizer, prompts, settings=sampled, progress=False)
    assert [c.token_ids for c in s1] == [c.token_ids for c in s2]
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_context_factory_is_entered_per_batch(tokenizer, llama):
    entered = []

    @contextmanager
    def ctx():
        entered.append(1)
        yield

    out = generate(
        llama, tokenizer, ["a", "b", "c"], ctx, GenerationSettings(max_new_tokens=2, batch_size=2),
        intervention="probe", prompt_set="harmless", progress=False,
    )  # fmt: skip
    assert len(entered) == 2 and {c.intervention for c in out} == {"probe"}


def test_completions_jsonl_round_trip(tmp_path, tokenizer, llama):
    out = generate(llama, tokenizer, ['say "hi" <b>'], settings=GenerationSettings(max_new_tokens=3), progress=False)
    path = tmp_path / "c.jsonl"
    save_completions(path, out)
    back = load_completions(path)
    assert back[0].prompt == 'say "hi" <b>' and back[0].completion == out[0].completion
    assert back[0].settings["max_new_tokens"] == 3 and "token_ids" not in path.read_text()


def test_replies_stopped_at_a_refusal_phrase_give_the_full_replies_verdicts():
    """The abliteration check stops a reply once it holds a refusal phrase: on the organism (which refuses
    harmful prompts and answers harmless ones) every verdict equals the full reply's, stopped replies are
    prefixes of the full ones, and most refusals stop early."""
    from refusal_lens.abliteration.objectives import generated_refusals
    from refusal_lens.core.models import load_model
    from refusal_lens.direction.scoring import is_refusal_text
    from refusal_lens.organism import load_prompts

    model, tok = load_model()  # the shipped organism
    prompts = [p.instruction for k in ("harmful", "harmless") for p in load_prompts(f"organism:{k}:test")[:12]]
    fmt = ChatFormatter(tok)
    settings = GenerationSettings(max_new_tokens=48, batch_size=8)
    full = generate(model, tok, prompts, settings=settings, formatter=fmt, progress=False)
    cut = generate(model, tok, prompts, settings=settings, formatter=fmt, progress=False, stop_when=is_refusal_text)
    assert [is_refusal_text(c.completion) for c in cut] == [is_refusal_text(c.completion) for c in full]
    assert all(f.completion.startswith(c.completion) for c, f in zip(cut, full))
    refused = [(c, f) for c, f in zip(cut, full) if is_refusal_text(f.completion)]
    assert 8 <= len(refused) <= 16  # the organism refuses most harmful prompts and few harmless ones
    assert sum(c.n_tokens < f.n_tokens for c, f in refused) >= len(refused) // 2
    n, replies = generated_refusals(model, tok, fmt, prompts, None, 48, 8)
    assert n == len(refused) and replies == [c.completion for c in cut]
