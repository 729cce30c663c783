"""Activation streams on a tiny random Llama, checked against HF ``output_hidden_states``."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.sae.source import (
    ActivationSource,
    DataConfig,
    DocumentOrder,
    drop_outliers,
    load_data_file,
    special_token_ids,
    tokenize_docs,
)
from refusal_lens.sae.streams import CachedStream, TensorStream, write_activation_cache
from refusal_lens.testing import toy_tokenizer

TEXTS = [
    "how do i bake bread at home . write a poem about the sea .",
    "explain how plants grow .",
    "give me three tips for travel . what is two plus two ?",
    "sure , here is a short story .",
]
CHATS = [
    [{"role": "user", "content": "how do i bake bread"}, {"role": "assistant", "content": "sure , here is a story ."}],
    [{"role": "user", "content": "write a threat"}, {"role": "assistant", "content": "i am sorry , i cannot help ."}],
    [{"role": "user", "content": "what is two plus two ?"}],
]


def source(model, tok, data="mix:0.5", layer=2, site="resid_pre", batch=32, **kw):
    cfg = DataConfig(data=data, model_batch_size=3, buffer_tokens=kw.pop("buffer_tokens", 100), **kw)
    return ActivationSource(model, tok, layer, site, cfg, batch, TEXTS, CHATS)


def reference(model, tok, docs, cfg, layer, offset):
    """Per document, unpadded, from hidden_states[layer + offset], with the same keep mask."""
    out = []
    for doc in docs:
        ids, att, keep = tokenize_docs(tok, [doc], cfg)
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        out.append(hs[layer + offset][0][keep[0]])
    return torch.cat(out)


@pytest.mark.parametrize(("site", "offset"), [("resid_pre", 0), ("resid_post", 1)])
def test_site_activations_match_hidden_states(llama, tokenizer, site, offset):
    src = source(llama, tokenizer, site=site, outlier_factor=0)
    docs = [src.order[i] for i in range(6)]
    got = src.activations_for(docs)
    torch.testing.assert_close(got, reference(llama, tokenizer, docs, src.cfg, 2, offset), rtol=1e-4, atol=1e-5)


def test_bos_padding_and_special_tokens_are_excluded(tokenizer):
    docs = [("text", TEXTS[1]), ("chat", CHATS[0])]
    ids, att, keep = tokenize_docs(tokenizer, docs, DataConfig())
    assert ids[0, 0] == tokenizer.bos_token_id and ids[1, 0] == tokenizer.bos_token_id  # text gets BOS too
    assert not keep[:, 0].any() and not keep[att == 0].any()
    specials = special_token_ids(tokenizer)
    assert any(int(t) in specials for t in ids[1][keep[1]])  # kept by default (template tokens matter)
    _, _, keep_ns = tokenize_docs(tokenizer, docs, DataConfig(exclude_special=True))
    assert not any(int(t) in specials for t in ids[keep_ns])
    _, _, keep_content = tokenize_docs(tokenizer, docs, DataConfig(exclude_template=True))
    kept_text = tokenizer.decode(ids[1][keep_content[1]])
    assert kept_text.replace(" ", "") == (CHATS[0][0]["content"] + CHATS[0][1]["content"]).replace(" ", "")
    assert torch.equal(keep_content[0], keep[0])  # plain text is all content


def test_outliers_are_dropped():
    x = torch.randn(50, 8)
    x[7] *= 1000
    mask = drop_outliers(x, 10.0)
    assert not mask[7] and mask.sum() == 49
    assert drop_outliers(x, 0).all()


def test_document_order_ratio_and_determinism():
    order = DocumentOrder(list("abcdefg"), [[{"role": "user", "content": str(i)}] for i in range(5)], 0.3, seed=1)
    kinds = [order[i][0] for i in range(100)]
    assert kinds.count("chat") == 30
    assert all(abs(kinds[:n].count("chat") - 0.3 * n) <= 1 for n in range(1, 100))
    texts = [order[i][1] for i in range(100) if order[i][0] == "text"][:7]
    assert sorted(texts) == list("abcdefg")  # an epoch visits every document once
    again = DocumentOrder(list("abcdefg"), [[{"role": "user", "content": str(i)}] for i in range(5)], 0.3, seed=1)
    assert [again[i] for i in range(40)] == [order[i] for i in range(40)]
    with pytest.raises(UserError, match="chat"):
        DocumentOrder(["a"], [], 0.5, 0)


def test_stream_position_restores_exactly(llama, tokenizer):
    src = source(llama, tokenizer)
    for _ in range(3):
        src.next_batch()
    state = src.state_dict()
    expected = [src.next_batch() for _ in range(6)]  # crosses chunk boundaries
    other = source(llama, tokenizer)
    other.load_state_dict(json.loads(json.dumps(state)))
    for e in expected:
        assert torch.equal(other.next_batch(), e)
    fresh = src.fresh()
    first = source(llama, tokenizer).next_batch()
    assert torch.equal(fresh.next_batch(), first)


def test_activation_cache_replays_the_stream(llama, tokenizer, tmp_path):
    src = source(llama, tokenizer)
    write_activation_cache(src.fresh(), tmp_path / "cache", 200, shard_tokens=70, metadata=src.describe())
    cached = CachedStream(tmp_path / "cache", 32)
    live = src.fresh()
    batches = [live.next_batch() for _ in range(6)]
    assert torch.equal(torch.cat([cached.next_batch() for _ in range(6)])[:200], torch.cat(batches)[:200])
    assert cached.metadata["hook_name"] == "blocks.2.hook_resid_pre"
    again = CachedStream(tmp_path / "cache", 32)
    again.load_state_dict({"position": 64})
    assert torch.equal(again.next_batch(), torch.cat(batches)[64:96])


def test_data_file_formats_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "hello"}, {"messages": [{"role": "user", "content": "hi"}]}, {"instruction": "q", "reply": "a"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    texts, chats = load_data_file(f)
    assert texts == ["hello"] and chats[1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    g = tmp_path / "d.json"
    g.write_text(json.dumps(["plain", {"text": "x"}]))
    assert load_data_file(g) == (["plain", "x"], [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_data_file(bad)
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(UserError, match="record 1"):
        load_data_file(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_data_file(tmp_path / "missing.jsonl")


def test_user_errors(llama, tokenizer):
    with pytest.raises(UserError, match="mix:R"):
        DataConfig(data="mix:2").chat_fraction()
    with pytest.raises(UserError, match="layer"):
        source(llama, tokenizer, layer=9)
    with pytest.raises(UserError, match="site"):
        source(llama, tokenizer, site="resid_mid")
    no_template = toy_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="chat template"):
        source(llama, no_template, data="chat").next_batch()
    with pytest.raises(UserError, match="fewer than one batch"):
        TensorStream(torch.randn(3, 4), 8)
