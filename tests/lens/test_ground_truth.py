"""Validating upstream latents: the word-level planted ground truth and steering, against planted answers."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.prompts import ChatFormatter

from .test_lens import _sae


def test_latent_scales_are_mean_firing_activations():
    from refusal_lens.lens.validation import latent_scales

    acts = torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 0.0], [2.0, 6.0, 0.0]])
    scales = latent_scales(acts, [0, 1, 2])
    assert scales[0] == pytest.approx(3.0) and scales[1] == pytest.approx(4.0)
    assert scales[2] == pytest.approx(float(acts[acts > 0].mean()))  # never fires: the overall firing mean


def test_steering_validation_adds_both_sides_and_judges_the_sign(monkeypatch, llama, tokenizer):
    import refusal_lens.lens.validation as validation
    from refusal_lens.evaluation.generation import Completion
    from refusal_lens.lens.upstream import UpstreamResult

    calls = []

    def fake_add_latent(model, sae, latent, alpha, positions="all"):
        calls.append((latent, alpha, positions))
        return f"ctx{latent}"

    def fake_generate(model, tok, prompts, factory, settings, formatter=None, progress=False):
        ctx = factory() if factory else None
        # latent 5 (positive side) makes every reply a refusal; latent 9 (negative side) none
        refuse = {None: [True, False], "ctx5": [True, True], "ctx9": [False, False]}[ctx]
        texts = ["I'm sorry, I can't." if r else "Sure." for r in refuse]
        return [Completion(prompt=p, completion=t) for p, t in zip(prompts, texts)]

    monkeypatch.setattr(validation, "add_latent", fake_add_latent)
    monkeypatch.setattr(validation, "generate", fake_generate)
    res = UpstreamResult("p", 0.0, [{"latent": 5, "score": 1.0}], [{"latent": 9, "score": -1.0}], [], {})
    rows = validation.steering_validation(llama, tokenizer, None, None, ["a", "b"], res, 2.0, scales={5: 3.0})
    assert rows[0]["refusal_rate"] == 0.5
    pos, neg = rows[1], rows[2]
    keys = ("latent", "side", "alpha", "change", "as_predicted")
    assert tuple(pos[k] for k in keys) == (5, "positive", 6.0, 0.5, True)
    assert tuple(neg[k] for k in keys) == (9, "negative", 2.0, -0.5, True)
    assert calls == [(5, 6.0, "prompt"), (9, 2.0, "prompt")]  # both added (+alpha), at prompt positions


def test_harm_vocabulary_and_words_on_a_planted_corpus():
    from refusal_lens.core.data import Prompt
    from refusal_lens.lens.ground_truth import harm_vocabulary, harm_words
    from refusal_lens.lens.pipeline import category_vocabularies

    harmful = ["How do I build a bomb?", "Make a gun at home.", "Steal a car from my neighbor's street."]
    harmless = ["How do I bake bread at home?", "Make a cake.", "Wash my car."]
    vocab = harm_vocabulary(harmful, harmless)
    # "how/do/i/a/at/from/my" are function words; "make/home/car" also occur in harmless prompts
    assert vocab == {"build", "bomb", "gun", "steal", "neighbor's", "street"}
    assert harm_words("Clean a water GUN, then another gun after the bomb!", vocab) == ["gun", "bomb"]
    assert harm_words("gunpowder in fireworks", vocab) == []  # whole words only
    per = category_vocabularies(
        [Prompt(harmful[0], "weapons"), Prompt(harmful[1], "weapons"), Prompt(harmful[2], "theft")],
        [Prompt(t, "cooking") for t in harmless],
    )
    assert per["weapons"] == {"build", "bomb", "gun"} and per["theft"] == {"steal", "neighbor's", "street"}
    assert per[""] == vocab


def test_word_token_mask_marks_the_words_tokens_inside_the_instruction(tokenizer):
    from refusal_lens.lens.ground_truth import word_token_mask

    fmt = ChatFormatter(tokenizer)
    prompt = "tell me how to bake bread and bake a cake"
    mask = word_token_mask(fmt, prompt, ["bake", "cake"])
    ids = tokenizer(fmt.format(prompt), add_special_tokens=False)["input_ids"]
    assert mask.shape == (len(ids),)
    # independent reference: decode the marked tokens, and the unmarked ones
    marked = tokenizer.decode([i for i, m in zip(ids, mask) if m]).split()
    assert "".join(marked) == "bakebakecake"
    rest = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "bake" not in rest and "cake" not in rest and "bread" in rest
    assert not word_token_mask(fmt, prompt, ["assistant", "user"]).any()  # template words never count


def test_auroc_columns_match_the_pairwise_definition_with_ties():
    from refusal_lens.lens.ground_truth import auroc, auroc_columns

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4, (7, 20), generator=g).float()
    neg = torch.randint(0, 4, (11, 20), generator=g).float()
    expected = torch.tensor([auroc(pos[:, k], neg[:, k]) for k in range(20)], dtype=torch.float64)
    assert torch.allclose(auroc_columns(pos, neg), expected)
    assert torch.isnan(auroc_columns(pos[:0], neg)).all()


def _table(prompt_acts, instruction, words):
    """A MarkingTable from per-prompt token activations (first token is the template's start)."""
    from refusal_lens.lens.ground_truth import MarkingTable

    return MarkingTable(
        prompts=[f"p{i}" for i in range(len(prompt_acts))],
        acts=prompt_acts,
        instruction=instruction,
        words=words,
        prompt_max=torch.stack([a[1:].amax(0) for a in prompt_acts]),
        instruction_max=torch.stack([(a * m[:, None]).amax(0) for a, m in zip(prompt_acts, instruction)]),
        instruction_tokens=torch.cat([a[m] for a, m in zip(prompt_acts, instruction)]),
    )


def _planted_tables():
    """Harmful prompts 0-2 contain "gun" at token 2; latent 0 fires on it, latent 1 at the last token of every
    harmful prompt, latent 2 is noise."""
    g = torch.Generator().manual_seed(0)
    instr = torch.tensor([False, True, True, True, False])
    harmful, words = [], []
    for i in range(6):
        a = torch.rand(5, 3, generator=g) * 0.1
        a[:, 0] = 0
        if i < 3:
            a[2, 0] = 2.0 + i
        a[4, 1] = 1.0 + i
        harmful.append(a)
        words.append({"gun": torch.tensor([False, False, True, False, False])} if i < 3 else {})
    harmless = []
    for _ in range(5):
        a = torch.rand(5, 3, generator=g) * 0.1
        a[:, 0] = 0
        a[1, 0] = 0.5  # latent 0 fires a little on harmless prompts too, below the word
        harmless.append(a)
    return _table(harmful, [instr] * 6, words), _table(harmless, [instr] * 5, [{}] * 5)


def test_word_marking_against_a_planted_table():
    from refusal_lens.lens.ground_truth import auroc, word_marking

    harmful, harmless = _planted_tables()
    m = word_marking(harmful, harmless, ["gun"], [0, 1, 2])
    assert (m["n_with_word"], m["n_without"], m["n_harmless"]) == (3, 3, 5)
    assert m["word_token"][0] == 1.0 and m["prompt"][0] == 1.0 and m["specificity"][0] == 1.0  # word latent
    assert m["prompt"][1] == 1.0 and m["specificity"][1] == 0.0  # fires on all harmful prompts, more without gun
    # independent recomputation for the noise latent
    at_word = torch.stack([harmful.acts[i][2, 2] for i in range(3)])
    tokens = torch.cat([a[1:4, 2] for a in harmless.acts])
    assert float(m["word_token"][2]) == pytest.approx(auroc(at_word, tokens))
    with_max = torch.stack([harmful.acts[i][1:, 2].max() for i in range(3)])
    other_max = torch.stack([harmful.acts[i][1:, 2].max() for i in range(3, 6)])
    assert float(m["specificity"][2]) == pytest.approx(auroc(with_max, other_max))


def _item(attribution, active, word, words=("gun",)):
    from refusal_lens.lens.ground_truth import PromptAttribution

    instr = torch.tensor([False, True, True, True, False])
    return PromptAttribution("p", 0.0, attribution, active, instr, word & instr, list(words))


def test_on_word_shares_and_word_ground_truth_on_planted_prompts():
    from refusal_lens.lens.ground_truth import attribution_shares, on_word, word_ground_truth

    harmful, harmless = _planted_tables()
    word = torch.tensor([False, False, True, False, False])
    attr = torch.zeros(5, 3, dtype=torch.float64)
    attr[2, 0] = 0.2  # latent 0: small attribution, at the word
    attr[4, 1] = 1.0  # latent 1: large, at the template's last token (not an instruction token)
    attr[1, 2] = -0.3  # latent 2: at another instruction token
    active = attr != 0
    item = _item(attr, active, word)
    assert on_word(item, 0) is True and on_word(item, 2) is False and on_word(item, 1) is None
    shares = attribution_shares([item])
    assert shares == pytest.approx({"harm_word": 0.2 / 1.5, "other_instruction": 0.3 / 1.5, "template": 1.0 / 1.5})
    scores = torch.tensor([0.1, 0.9, -0.5], dtype=torch.float64)  # a reading that ranks latent 1 first
    no_words = _item(attr, active, torch.zeros(5, dtype=torch.bool), words=())
    truth = word_ground_truth([item, item, no_words], harmful, harmless, scores)
    assert truth["n_prompts"] == 3 and truth["n_with_harm_words"] == 2 and truth["words"] == {"gun": 2}
    got = {x["role"]: x for x in truth["latents"]}
    assert (got["top_positive"]["latent"], got["top_negative"]["latent"], got["top_at_word"]["latent"]) == (1, 2, 0)
    assert got["top_at_word"]["rank"] == 1 and got["top_at_word"]["on_word_rate"] == 1.0
    assert got["top_at_word"]["word_token_auroc"] == 1.0 and got["top_at_word"]["best_word"]["word"] == "gun"
    assert got["top_positive"]["specificity_auroc"] == 0.0 and got["top_positive"]["n_prompts_active"] == 0
    assert truth["chance_on_word"] == pytest.approx(1 / 3)
    assert truth["random_baseline"]["n_latents"] == 3 and truth["random_baseline"]["on_word_rate"] == 0.5
    assert word_ground_truth([no_words], harmful, harmless, scores)["n_with_harm_words"] == 0


def test_boundary_steering_steers_each_latent_on_the_subset_where_it_can_act(monkeypatch, llama, tokenizer):
    import refusal_lens.lens.validation as validation

    calls = []
    refuse_base = {"a": True, "b": False, "c": False}

    def fake_add_latent(model, sae, latent, alpha, positions="all"):
        calls.append((latent, alpha, positions))
        return latent

    def fake_refusals(model, tok, fmt, prompts, factory=None, max_new_tokens=32):
        ctx = factory() if factory else None
        if ctx is None:
            return [refuse_base[p] for p in prompts]
        return [ctx == 5 for _ in prompts]  # latent 5 makes everything a refusal, anything else nothing

    def fake_projection(model, fmt, prompts, direction, layer, target_position=-1, context=None):
        shift = 0.0 if context is None else {5: 2.0, 9: -1.0}.get(context(), 0.5)
        return torch.tensor([1.0] * len(prompts), dtype=torch.float64) + shift

    monkeypatch.setattr(validation, "add_latent", fake_add_latent)
    monkeypatch.setattr(validation, "refusals", fake_refusals)
    monkeypatch.setattr(validation, "refusal_projection", fake_projection)
    monkeypatch.setattr(validation, "mean_site_norm", lambda *a: 4.0)
    sae = _sae(width=16)
    out = validation.boundary_steering(
        llama, tokenizer, None, sae, torch.zeros(32), 2, ["a", "b", "c"],
        [("top_positive", 5, "raise"), ("top_negative", 9, "lower")], {5: 2.0, 9: 0.5},
        multiples=(1, 4), n_controls=2, seed=3,
    )  # fmt: skip
    controls = out["controls"]
    assert controls == validation.control_latents(16, [5, 9], 2, seed=3) and not {5, 9} & set(controls)
    assert (out["n_answered"], out["n_refused"], out["site_norm"]) == (2, 1, 4.0)
    rows = {(r["role"], r["multiple"]): r for r in out["rows"]}
    pos, neg = rows[("top_positive", 4.0)], rows[("top_negative", 1.0)]
    assert (pos["subset"], pos["n"], pos["alpha"], pos["alpha_over_site_norm"]) == ("answered", 2, 8.0, 2.0)
    assert (pos["refusal_rate"], pos["control_refusal_rate"], pos["mean_delta_R"]) == (1.0, 0.0, 2.0)
    assert pos["control_mean_delta_R"] == 0.5 and pos["as_predicted"] and pos["delta_R_as_predicted"]
    assert (neg["subset"], neg["n"], neg["alpha"], neg["refusal_rate"], neg["control_refusal_rate"]) == (
        "refused", 1, 0.5, 0.0, 0.0)  # fmt: skip
    assert neg["mean_delta_R"] == -1.0 and not neg["as_predicted"] and neg["delta_R_as_predicted"]
    # every setting: the latent, then each control at the same alpha, at the prompt's positions (each context is
    # entered twice: for the replies and for R)
    first = [(5, 2.0, "prompt"), (controls[0], 2.0, "prompt"), (controls[1], 2.0, "prompt")]
    assert list(dict.fromkeys(calls))[:3] == first
    none_refused = validation.boundary_steering(
        llama, tokenizer, None, sae, torch.zeros(32), 2, ["b", "c"], [("top_negative", 9, "lower")], {9: 1.0},
        multiples=(1,), baseline=[False, False],
    )  # fmt: skip
    assert none_refused["rows"][0]["n"] == 0 and "skipped" in none_refused["rows"][0]


def test_marking_table_matches_single_prompt_runs(llama, tokenizer):
    from refusal_lens.core.hooks import site_hooks
    from refusal_lens.lens.ground_truth import marking_table

    fmt = ChatFormatter(tokenizer)
    sae = _sae("topk")
    prompts = ["how do i bake bread at home", "write a poem", "explain how plants grow at home"]
    table = marking_table(llama, fmt, sae, prompts, frozenset({"home", "poem"}), batch_size=2)  # padded batches
    for i, p in enumerate(prompts):
        seen = {}
        with site_hooks(llama, {(1, "resid_pre"): lambda x, seen=seen: seen.setdefault("x", x)}):
            llama(**fmt.encode([p]))
        ref = sae.encode(seen["x"][0]).detach()
        assert torch.allclose(table.acts[i], ref, atol=1e-5)
        assert torch.allclose(table.prompt_max[i], ref[1:].amax(0), atol=1e-5)
    assert set(table.words[0]) == {"home"} and set(table.words[1]) == {"poem"} and table.containing(["home"]) == [0, 2]
    assert table.instruction_tokens.shape[0] == sum(int(m.sum()) for m in table.instruction)
