"""Evaluation metrics against float64 recomputation and planted answers (a lossless SAE, an ablating SAE)."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.sae import EvalConfig, SAEConfig, TensorStream, create_sae, evaluate_sae, reconstruction_metrics
from refusal_lens.sae.source import ActivationSource, DataConfig

TEXTS = ["how do i bake bread at home . write a poem about the sea .", "explain how plants grow . sure ."]
CHATS = [[{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four ."}]]


def lossless(d: int):
    """ReLU(x) - ReLU(-x) = x: a standard SAE of width 2d that reconstructs exactly."""
    sae = create_sae(SAEConfig(arch="standard", d_in=d, width=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_reconstruction_metrics_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) + 2.0
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=32, k=3), g).eval()
    with torch.no_grad():
        sae.b_enc[:4] = 5.0  # latents 0-3 fire almost always -> dense
        sae.b_enc[-4:] = -100.0  # latents 28-31 never fire -> dead
    m = reconstruction_metrics(sae, TensorStream(x, 128), 512)
    with torch.no_grad():
        f = sae.encode(x).double()
        xh = sae.decode(sae.encode(x)).double()
    xd = x.double()
    assert m["tokens"] == 512
    assert m["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()))
    assert m["mse"] == pytest.approx(float((xd - xh).pow(2).sum(-1).mean()), rel=1e-6)
    assert m["fvu"] == pytest.approx(float((xd - xh).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()), rel=1e-6)
    assert m["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(xd, xh).mean()), rel=1e-6)
    assert m["shrinkage"] == pytest.approx(float(xh.pow(2).sum() / (xd * xh).sum()), rel=1e-6)
    rate = (f > 0).double().mean(0)
    assert m["dead_frac"] == pytest.approx(float((rate == 0).double().mean()))
    assert m["dense_frac"] == pytest.approx(float((rate > 0.1).double().mean()))
    assert m["dead_frac"] >= 4 / 32 and m["dense_frac"] >= 3 / 32


def test_lossless_sae_recovers_all_loss_and_zero_sae_none(llama, tokenizer):
    cfg = DataConfig(data="mix:0.5", model_batch_size=4, buffer_tokens=64)
    src = ActivationSource(llama, tokenizer, 1, "resid_pre", cfg, 32, TEXTS, CHATS)
    m = evaluate_sae(lossless(32), src, EvalConfig(tokens=64, batch_size=32, ce_docs=6))
    assert m["fvu"] == pytest.approx(0.0, abs=1e-10) and m["cosine"] == pytest.approx(1.0)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert m["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_zero_ablation"] != pytest.approx(m["ce_clean"])
    # an SAE that outputs zeros reproduces zero-ablation exactly
    zero = lossless(32)
    with torch.no_grad():
        zero.W_dec.zero_()
    z = evaluate_sae(zero, src.fresh(), EvalConfig(tokens=64, batch_size=32, ce_docs=6))
    assert z["ce_sae"] == pytest.approx(z["ce_zero_ablation"], abs=1e-6)
    assert z["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    assert z["ce_tokens"] == m["ce_tokens"] > 0


def test_out_of_range_metrics_are_explained():
    from refusal_lens.sae.evaluate import metric_warnings

    fine = {"ce_clean": 2.0, "ce_sae": 2.1, "ce_recovered_zero": 0.97, "ce_recovered_mean": 0.9, "shrinkage": 1.02}
    assert metric_warnings(fine) == []
    # the figures a user met: splicing the SAE in lowered the loss below the clean model's
    odd = {"ce_clean": 6.37, "ce_sae": 5.46, "ce_recovered_zero": 1.34, "ce_recovered_mean": 1.2, "shrinkage": 1.51,
           "fvu": 0.60}  # fmt: skip
    warnings = metric_warnings(odd)
    assert len(warnings) == 3
    assert "below" in warnings[0] and "5.460" in warnings[0] and "6.370" in warnings[0]
    assert "longer" in warnings[2] and "0.60" in warnings[2]


def test_clean_loss_equals_an_independent_hf_loss(tokenizer):
    """ce_clean is the model's own mean next-token loss on the same tokens (HF labels= path, float64 sum)."""
    from refusal_lens.sae import ActivationSource, DataConfig
    from refusal_lens.sae.evaluate import spliced_loss_metrics
    from refusal_lens.sae.source import tokenize_docs
    from refusal_lens.testing import random_model

    model = random_model("llama", n_layers=2, d_model=32)
    docs = ["the cat sat on the mat", "a dog ran far away today", "plants grow in the sun"]
    cfg = DataConfig(data="text", model_batch_size=8)
    source = ActivationSource(model, tokenizer, 1, "resid_pre", cfg, 32, texts=docs, chats=[])
    sae = create_sae(SAEConfig(arch="topk", d_in=32, width=64, k=4), torch.Generator().manual_seed(0))
    got = spliced_loss_metrics(sae, source, len(docs), torch.zeros(32))
    ids, attention, _ = tokenize_docs(tokenizer, [source.order[i] for i in range(len(docs))], cfg)
    total, count = 0.0, 0
    for row, mask in zip(ids, attention):
        real = row[mask.bool()].unsqueeze(0)
        with torch.no_grad():
            loss = model(input_ids=real, labels=real).loss.double()
        total += float(loss) * (real.shape[1] - 1)
        count += real.shape[1] - 1
    assert got["ce_tokens"] == count
    assert abs(got["ce_clean"] - total / count) < 1e-5
