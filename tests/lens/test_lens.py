"""Decomposition of a direction by an SAE, latent steering and the refusal gradient, against references."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.interventions import adder, apply_direction
from refusal_lens.lens.decompose import decompose_direction, omp_curve, site_activations, sparsity_curve
from refusal_lens.lens.latents import add_latent, clamp_latent, sae_site
from refusal_lens.lens.upstream import first_order_check, latent_scores, refusal_gradient, refusal_projection
from refusal_lens.sae import SAEConfig, create_sae
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS


def _sae(arch="standard", d=32, width=64, layer=1, seed=0, dtype="float32"):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch=arch, d_in=d, width=width, k=8, dtype=dtype))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d))  # non-zero, so the cancellation is really tested
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(torch.randn(width) * 0.1)
    sae.metadata = {"hook_name": f"blocks.{layer}.hook_resid_pre"}
    sae.requires_grad_(False)
    return sae


@pytest.fixture(scope="module")
def model64():
    return random_model("llama", n_layers=4, d_model=32, seed=2).double()


def test_sae_site_from_metadata_and_errors():
    sae = _sae(layer=3)
    assert sae_site(sae) == (3, "resid_pre")
    assert sae_site(sae, layer=1, site="mlp_out") == (1, "mlp_out")
    sae.metadata = {}
    with pytest.raises(UserError, match="pass --layer and --site"):
        sae_site(sae)


@pytest.mark.parametrize("arch", ["standard", "topk", "gated", "jumprelu"])
def test_reconstructed_direction_is_delta_f_times_w_dec_exactly(llama, tokenizer, arch):
    sae = _sae(arch)
    fmt = ChatFormatter(tokenizer)
    dec = decompose_direction(llama, fmt, sae, HARMFUL, HARMLESS, max_k=8)
    xh = site_activations(llama, fmt, HARMFUL, 1, "resid_pre")
    xb = site_activations(llama, fmt, HARMLESS, 1, "resid_pre")
    r = xh.double().mean(0) - xb.double().mean(0)
    fh, fb = sae.encode(xh).double(), sae.encode(xb).double()
    via_decoder = (fh.mean(0) - fb.mean(0)) @ sae.W_dec.double()  # Δf̄·W_dec: no b_dec anywhere
    via_sae = sae.decode(fh.float()).double().mean(0) - sae.decode(fb.float()).double().mean(0)
    assert torch.allclose(via_sae, via_decoder, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(via_decoder, r, dim=0)
    assert dec.cosine == pytest.approx(float(cos), abs=1e-5)
    assert dec.relative_error == pytest.approx(float((via_decoder - r).pow(2).sum() / r.pow(2).sum()), rel=1e-4)
    best = torch.nn.functional.cosine_similarity(sae.W_dec.double(), r.unsqueeze(0), dim=1).max()
    assert dec.max_single_latent_cosine == pytest.approx(float(best), abs=1e-6)


def test_sparsity_curves_recover_a_planted_sparse_direction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 32, generator=g, dtype=torch.float64)
    r = 3 * w[10] / w[10].norm() - 2 * w[200] / w[200].norm()
    delta_f = torch.zeros(256, dtype=torch.float64)
    delta_f[10], delta_f[200], delta_f[5] = 3 / w[10].norm(), -2 / w[200].norm(), 1e-3
    curve = dict((k, e) for k, e in sparsity_curve(r, w, delta_f, [1, 2, 4]))
    assert curve[1] > 0.1 and curve[2] < 1e-20 and curve[4] < 1e-20
    omp = dict((k, e) for k, e in omp_curve(r, w, [1, 2, 4]))
    assert omp[2] < 1e-20 and omp[1] > 0.1


def test_gradient_equals_central_finite_difference(model64, tokenizer):
    fmt = ChatFormatter(tokenizer)
    r = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prompt = "how do i bake bread"
    rg = refusal_gradient(model64, fmt, prompt, r, target_layer=3, source_layer=1)
    assert rg.grad.shape == (len(rg.tokens), 32)
    eps = 1e-3  # Llama's RMSNorm computes in float32, so smaller steps drown in rounding
    for pos, coord in [(3, 5), (-1, 0), (6, 31)]:
        e = torch.zeros(32, dtype=torch.float64)
        e[coord] = 1.0

        def bump(sign, pos=pos, e=e):
            def op(x, _):
                y = x.clone()
                y[:, pos] += sign * eps * e
                return y

            return lambda: apply_direction(model64, e, op, [(1, "resid_pre")])

        up = refusal_projection(model64, fmt, [prompt], r, 3, context=bump(+1))[0]
        down = refusal_projection(model64, fmt, [prompt], r, 3, context=bump(-1))[0]
        fd = float((up - down) / (2 * eps))
        assert rg.grad[pos, coord] == pytest.approx(fd, rel=1e-3, abs=1e-8)
    assert rg.value == pytest.approx(float(refusal_projection(model64, fmt, [prompt], r, 3)[0]), rel=1e-9)
    with pytest.raises(UserError, match="must come before the target layer"):
        refusal_gradient(model64, fmt, prompt, r, target_layer=1, source_layer=2)


def test_first_order_check_agrees_for_small_alpha(model64, tokenizer):
    fmt = ChatFormatter(tokenizer)
    r = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sae = _sae("standard", dtype="float64")
    rows = first_order_check(model64, fmt, "how do i bake bread", r, 3, sae, latent=7, alphas=(1e-3, 1e-2))
    for row in rows:
        assert row["measured"] == pytest.approx(row["predicted"], rel=0.1)


def test_latent_scores_match_their_definitions(model64, tokenizer):
    fmt = ChatFormatter(tokenizer)
    r = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sae = _sae("standard", dtype="float64")
    rg = refusal_gradient(model64, fmt, "how do i bake bread", r, 3, 1)
    w = sae.W_dec.detach()
    dot_sum = latent_scores(rg, sae, "dot", "sum")
    assert torch.allclose(dot_sum, (rg.grad @ w.T).sum(0))
    assert torch.allclose(latent_scores(rg, sae, "dot", "mean"), dot_sum / len(rg.tokens))
    f = sae.encode(rg.acts)
    assert torch.allclose(latent_scores(rg, sae, "attribution", "sum"), (f * (rg.grad @ w.T)).sum(0))
    cos = latent_scores(rg, sae, "cosine", "mean")
    assert cos.abs().max() <= 1 + 1e-9
    instr = latent_scores(rg, sae, "dot", "sum", positions="instruction")
    assert torch.allclose(instr, (rg.grad[rg.instruction_mask] @ w.T).sum(0))


def test_latent_steering_contexts(llama, tokenizer):
    fmt = ChatFormatter(tokenizer)
    sae = _sae("standard")
    batch = fmt.encode(HARMLESS[:2])
    plain = llama(**batch).logits
    with add_latent(llama, sae, 3, alpha=2.0):
        added = llama(**batch).logits
    with apply_direction(llama, sae.W_dec[3].detach(), adder(2.0), [(1, "resid_pre")]):
        reference = llama(**batch).logits
    assert torch.allclose(added, reference) and not torch.allclose(added, plain)
    seen = {}
    with clamp_latent(llama, sae, 3, value=5.0):
        # read the edited activation after the clamp hook and check latent 3's coefficient moved to 5
        from refusal_lens.core.hooks import site_hooks

        with site_hooks(llama, {(1, "resid_pre"): lambda x: seen.setdefault("x", x.detach())}):
            llama(**batch)
    with torch.no_grad():
        raw = site_activations(llama, fmt, HARMLESS[:2], 1, "resid_pre", position=-1)
        f_raw = sae.encode(raw)[:, 3]
    expected = raw + (5.0 - f_raw)[:, None] * sae.W_dec[3].detach()
    assert torch.allclose(seen["x"][:, -1], expected, atol=1e-5)


def test_category_upstream_ranks_by_the_mean_of_per_prompt_scores(model64, tokenizer):
    from refusal_lens.direction.compute import Direction
    from refusal_lens.lens.pipeline import category_gradients, category_upstream

    fmt = ChatFormatter(tokenizer)
    r = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sae = _sae("standard", dtype="float64")
    direction = Direction(r, 3, -1, None, {})
    prompts = ["how do i bake bread", "how do i make a bomb", "tell me about gardens"]
    grads = category_gradients(model64, fmt, prompts, direction, sae)
    res = category_upstream(prompts, grads, sae, "attribution", "instruction", top=4)
    # independent recomputation: each prompt's attribution over its instruction tokens, then the mean
    per_prompt = []
    for p in prompts:
        rg = refusal_gradient(model64, fmt, p, r, 3, 1)
        f = sae.encode(rg.acts)
        keep = rg.instruction_mask
        per_prompt.append((f[keep] * (rg.grad[keep] @ sae.W_dec.detach().T)).mean(0))
    mean = torch.stack(per_prompt).mean(0)
    expected = torch.argsort(mean, descending=True)[:4].tolist()
    assert [x["latent"] for x in res.positive] == expected
    assert res.positive[0]["score"] == pytest.approx(float(mean[expected[0]]), rel=1e-9)
    assert [x["latent"] for x in res.negative] == torch.argsort(mean)[:4].tolist()
    assert res.settings["prompts_averaged"] == 3


# --- word-level ground truth and boundary steering (issue #6) ---------------------------------------------


def test_token_attribution_is_the_first_order_effect_of_removing_a_latent_at_one_token(model64, tokenizer):
    from refusal_lens.core.hooks import site_hooks
    from refusal_lens.lens.upstream import token_attribution

    fmt = ChatFormatter(tokenizer)
    r = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sae = _sae("standard", dtype="float64")
    prompt = "how do i bake bread"
    rg = refusal_gradient(model64, fmt, prompt, r, 3, 1)
    attr = token_attribution(rg, sae)
    f = sae.encode(rg.acts)
    assert torch.allclose(attr, f * (rg.grad @ sae.W_dec.detach().T))  # the definition
    eps = 1e-3
    for pos in (int(rg.instruction_mask.nonzero()[0]), int(rg.instruction_mask.nonzero()[-1]), -1):
        k = int(attr[pos].abs().argmax())
        assert attr[pos, k].abs() > 0

        def remove(sign, pos=pos, k=k):
            def fn(x):
                y = x.clone()
                fk = sae.encode(x[:, pos])[:, k : k + 1]  # the latent's actual activation there
                y[:, pos] -= sign * eps * fk * sae.W_dec[k].detach()
                return y

            return lambda: site_hooks(model64, {(1, "resid_pre"): fn})

        up = refusal_projection(model64, fmt, [prompt], r, 3, context=remove(+1))[0]
        down = refusal_projection(model64, fmt, [prompt], r, 3, context=remove(-1))[0]
        # removing f_k(x_i)·W_dec[k] at position i alone changes R by -A[i, k] to first order
        assert float((up - down) / (2 * eps)) == pytest.approx(-float(attr[pos, k]), rel=1e-3, abs=1e-8)
