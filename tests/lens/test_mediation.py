"""Activation patching of a word's effect on R (refusal_lens.lens.mediation), on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.lens.mediation import _run, position_groups, swap_words, word_mediation

PROMPT = "explain how to steal a car"
WORDS = ["steal"]


@pytest.fixture
def setup(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    direction = torch.randn(llama.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return llama, fmt, direction


def _n_tokens(fmt, text):
    return len(fmt.tokenizer(fmt.format(text), add_special_tokens=False)["input_ids"])


def test_swap_words_keeps_the_token_count_and_swaps_whole_words_only(setup):
    _, fmt, _ = setup
    swapped = swap_words(fmt, PROMPT, WORDS, replacements=("x" * 40, "take", "thing", "box", "cup", "lamp"))
    assert swapped is not None and "steal" not in swapped
    assert _n_tokens(fmt, swapped) == _n_tokens(fmt, PROMPT)
    assert swapped.replace(swapped.split()[3], "steal") == PROMPT  # only the word changed
    assert swap_words(fmt, "explain how to stealthily park", WORDS) is None  # "stealthily" is not "steal"
    assert swap_words(fmt, PROMPT, []) is None
    assert swap_words(fmt, PROMPT, WORDS, replacements=("x" * 40,)) is None  # no equal-length stand-in


def test_position_groups_partition_the_prompt(setup):
    _, fmt, _ = setup
    groups = position_groups(fmt, PROMPT, WORDS)
    stacked = torch.stack(list(groups.values())).int()
    assert (stacked.sum(0) == 1).all()  # every token in exactly one group
    assert groups["word"].any() and groups["instruction"].any() and groups["template"].any()
    ids = fmt.tokenizer(fmt.format(PROMPT), add_special_tokens=False)["input_ids"]
    word_text = fmt.tokenizer.decode([i for i, m in zip(ids, groups["word"]) if m])
    assert word_text.strip() == "steal"


def test_at_the_embeddings_the_word_tokens_carry_the_whole_effect(setup):
    """At resid_pre[0] only the swapped tokens differ, so patching them reproduces the swapped run exactly."""
    model, fmt, direction = setup
    res = word_mediation(model, fmt, [(PROMPT, WORDS)], direction, target_layer=3, layers=[0, 1, 2],
                         min_effect=-1e9)  # fmt: skip
    if res["n_prompts"] == 0:  # the random direction happens to be blind to the word
        pytest.skip("the swap leaves R unchanged for this random model")
    layer0 = res["layers"][0]["shares"]
    assert layer0["word"] == pytest.approx(1.0, abs=1e-5)
    assert layer0["instruction"] == pytest.approx(0.0, abs=1e-5)
    assert layer0["template"] == pytest.approx(0.0, abs=1e-5)


def test_patching_every_position_reproduces_the_swapped_run_at_any_layer(setup):
    model, fmt, direction = setup
    unit = (direction / direction.norm()).double()
    swapped = swap_words(fmt, PROMPT, WORDS)
    assert swapped is not None
    (r_corrupt,), acts = _run(model, fmt, [swapped], unit, 3, -1, record=[0, 1, 2])
    (r_clean,), _ = _run(model, fmt, [PROMPT], unit, 3, -1)
    everything = torch.ones(_n_tokens(fmt, PROMPT), dtype=torch.bool)
    # one batch: rows 0-2 patch every position at layers 0, 1, 2; row 3 patches nothing
    patches = [(layer, acts[layer], everything) for layer in (0, 1, 2)] + [(1, acts[1], ~everything)]
    patched, _ = _run(model, fmt, [PROMPT] * 4, unit, 3, -1, patches=patches)
    assert patched[:3] == pytest.approx([r_corrupt] * 3, abs=1e-5)
    assert patched[3] == pytest.approx(r_clean, abs=1e-5)


def test_batched_patching_equals_one_prompt_at_a_time(setup):
    model, fmt, direction = setup
    items = [(PROMPT, WORDS)]
    one = word_mediation(model, fmt, items, direction, 3, min_effect=-1e9, batch_size=1)
    many = word_mediation(model, fmt, items, direction, 3, min_effect=-1e9, batch_size=24)
    for a, b in zip(one["layers"], many["layers"]):
        assert a["shares"] == pytest.approx(b["shares"], abs=1e-5)


def test_skips_are_counted_and_layers_are_checked(setup):
    model, fmt, direction = setup
    res = word_mediation(model, fmt, [(PROMPT, []), (PROMPT, WORDS)], direction, 3, layers=[1], min_effect=1e9)
    assert res["n_prompts"] == 0 and res["skipped"] == {"no_swap": 1, "small_effect": 1}
    with pytest.raises(UserError, match="before the target layer"):
        word_mediation(model, fmt, [(PROMPT, WORDS)], direction, 3, layers=[3])
