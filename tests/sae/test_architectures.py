"""Each architecture against an independent float64 recomputation of its defining formula."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.sae import ARCHITECTURES, SAEConfig, create_sae, reconstruction_loss

D, M = 16, 64


def make(arch: str, **kw) -> torch.nn.Module:
    sae = create_sae(SAEConfig(arch=arch, d_in=D, width=M, k=kw.pop("k", 4), **kw), torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero biases so that a forgotten bias term cannot pass
        g = torch.Generator().manual_seed(1)
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return sae


def x_batch(n: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def assert_batch_independent(sae, x: torch.Tensor, theta: torch.Tensor) -> None:
    """Encoding rows one at a time gives the batch's encoding (up to matmul rounding; entries within
    rounding distance of the threshold may legitimately flip, so they are skipped)."""
    full = sae.encode(x).detach()
    single = torch.cat([sae.encode(x[i : i + 1]) for i in range(x.shape[0])]).detach()
    z = sae.pre_acts(x).detach()
    safe = (z - theta).abs() > 1e-4
    torch.testing.assert_close(full[safe], single[safe], rtol=1e-5, atol=1e-5)
    assert safe.float().mean() > 0.99


def p64(sae, name):
    return getattr(sae, name).detach().double()


def test_shapes_and_dtypes():
    for arch in ARCHITECTURES:
        sae = make(arch)
        assert sae.W_enc.shape == (D, M) and sae.W_dec.shape == (M, D) and sae.b_dec.shape == (D,)
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        x_hat, f, aux = sae(x_batch())
        assert x_hat.shape == (32, D) and f.shape == (32, M) and isinstance(aux, dict)


def test_unknown_arch_and_bad_k():
    with pytest.raises(UserError, match="unknown"):
        create_sae(SAEConfig(arch="nope", d_in=D, width=M))
    with pytest.raises(UserError, match="k=0"):
        create_sae(SAEConfig(arch="topk", d_in=D, width=M, k=0))


def test_standard_formula_and_penalty():
    sae = make("standard", sparsity_coeff=2.0)
    x = x_batch()
    f_ref = torch.relu((x.double() - p64(sae, "b_dec")) @ p64(sae, "W_enc") + p64(sae, "b_enc"))
    x_hat, f, aux = sae(x)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), f_ref @ p64(sae, "W_dec") + p64(sae, "b_dec"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["sparsity"].item(), 2.0 * float(f_ref.abs().sum(-1).mean()), rtol=1e-5, atol=0)


def test_decoder_gradient_parallel_to_rows_is_removed():
    sae = make("standard")
    x = x_batch()
    x_hat, f, aux = sae(x)
    (reconstruction_loss(x, x_hat) + aux["sparsity"]).backward()
    g0 = sae.W_dec.grad.detach().double().clone()
    w = p64(sae, "W_dec")
    w = w / w.norm(dim=1, keepdim=True)
    expected = g0 - (g0 * w).sum(1, keepdim=True) * w
    sae.before_optimizer_step()
    g1 = sae.W_dec.grad.double()
    assert (g1 * w).sum(1).abs().max() < 1e-5
    torch.testing.assert_close(g1, expected, rtol=1e-5, atol=1e-6)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))


def test_april_penalty_weights_by_decoder_norm_and_tied_init():
    sae = create_sae(SAEConfig(arch="april", d_in=D, width=M, sparsity_coeff=3.0), torch.Generator().manual_seed(0))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.apply_b_dec_to_input and not sae.unit_norm_decoder
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, M)[:, None])
        sae.b_dec.fill_(0.3)
    x = x_batch()
    f_ref = torch.relu(x.double() @ p64(sae, "W_enc") + p64(sae, "b_enc"))  # no b_dec subtraction
    _, f, aux = sae(x)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    pen = 3.0 * (f_ref * p64(sae, "W_dec").norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(aux["sparsity"].item(), float(pen), rtol=1e-5, atol=0)


def test_gated_forward_matches_formula_and_aux_uses_frozen_decoder():
    sae = make("gated", sparsity_coeff=0.7)
    x = x_batch()
    xc = x.double() - p64(sae, "b_dec")
    pi_gate = xc @ p64(sae, "W_enc") + p64(sae, "b_gate")
    pi_mag = xc @ (torch.exp(p64(sae, "r_mag")) * p64(sae, "W_enc")) + p64(sae, "b_mag")
    f_ref = (pi_gate > 0).double() * torch.relu(pi_mag)
    x_hat, f, aux = sae(x)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), f_ref @ p64(sae, "W_dec") + p64(sae, "b_dec"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        aux["sparsity"].item(), 0.7 * float(torch.relu(pi_gate).sum(-1).mean()), rtol=1e-5, atol=0
    )
    via = torch.relu(pi_gate) @ p64(sae, "W_dec") + p64(sae, "b_dec")
    torch.testing.assert_close(
        aux["gate_recon"].item(), float((x.double() - via).pow(2).sum(-1).mean()), rtol=1e-5, atol=0
    )
    aux["gate_recon"].backward()  # the frozen decoder: the aux loss trains only the gate path
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec still centres the input
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_topk_l0_equals_k_and_matches_reference():
    for k in (1, 4, 9):
        sae = make("topk", k=k)
        with torch.no_grad():
            sae.b_enc.fill_(1.0)  # every pre-activation positive, so exactly k survive
        x = x_batch(64)
        f = sae.encode(x)
        assert torch.equal((f > 0).sum(-1), torch.full((64,), k))
        z = torch.relu((x.double() - p64(sae, "b_dec")) @ p64(sae, "W_enc") + p64(sae, "b_enc"))
        kth = z.topk(k, dim=-1).values[:, -1:]
        torch.testing.assert_close(f.double(), z * (z >= kth), rtol=1e-5, atol=1e-5)


def test_auxk_loss_reference():
    sae = make("topk", k=4, k_aux=3, aux_coeff=0.5, dead_tokens=10)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::5] = True
    sae.tokens_since_fired[dead] = 100
    x = x_batch()
    x_hat, f, aux = sae(x)
    z = torch.relu((x.double() - p64(sae, "b_dec")) @ p64(sae, "W_enc") + p64(sae, "b_enc"))
    zd = torch.where(dead, z, torch.full_like(z, -1.0))
    vals, idx = zd.topk(3, dim=-1)
    f_aux = torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
    e = x.double() - x_hat.detach().double()
    ref = 0.5 * (e - f_aux @ p64(sae, "W_dec")).pow(2).sum(-1).mean()
    torch.testing.assert_close(aux["auxk"].item(), float(ref), rtol=1e-5, atol=1e-6)
    sae.tokens_since_fired.zero_()
    assert sae(x)[2]["auxk"].item() == 0.0


def test_batchtopk_keeps_batch_k_and_infers_batch_independently():
    sae = make("batchtopk", k=4)
    x = x_batch(64)
    sae.train()
    _, f, _ = sae(x)
    assert int((f > 0).sum()) == 64 * 4  # k per token on average, not per token
    assert (f > 0).sum(-1).float().std() > 0
    kept_min = f[f > 0].min()
    torch.testing.assert_close(sae.threshold, kept_min)  # first batch: threshold = smallest kept value
    sae.eval()
    assert_batch_independent(sae, x, sae.threshold)
    z = torch.relu(sae.pre_acts(x))
    assert torch.equal(sae.encode(x), z * (z > sae.threshold))
    assert not torch.equal(sae.encode(x[:8]), sae.train().select(torch.relu(sae.pre_acts(x[:8]))))


def test_batchtopk_threshold_ema():
    sae = make("batchtopk", k=4, threshold_momentum=0.9)
    sae.train()
    sae(x_batch(64, seed=3))
    t0 = float(sae.threshold)
    _, f, _ = sae(x_batch(64, seed=4))
    expected = 0.9 * t0 + 0.1 * f[f > 0].min().item()
    assert abs(float(sae.threshold) - expected) < 1e-6


def test_jumprelu_formula_batch_independence_and_ste_gradients():
    eps = 0.05
    sae = make("jumprelu", bandwidth=eps, sparsity_coeff=0.3)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.01, 0.5, M))
    x = x_batch(128)
    z = (x.double() - p64(sae, "b_dec")) @ p64(sae, "W_enc") + p64(sae, "b_enc")
    theta = p64(sae, "threshold")
    f_ref = z * (z > theta)
    full = sae.encode(x)
    torch.testing.assert_close(full.double(), f_ref, rtol=1e-5, atol=1e-5)
    assert_batch_independent(sae, x, sae.threshold.detach())
    # straight-through gradients w.r.t. theta, recomputed by hand (rectangle kernel of width eps)
    x_hat, f, aux = sae(x)
    g_out = torch.randn_like(f)
    ((f * g_out).sum() + aux["sparsity"]).backward()
    kernel = ((z - theta) / eps).abs() < 0.5
    d_jump = (g_out.double() * -(theta / eps) * kernel).sum(0)
    d_l0 = 0.3 * (-(1 / eps) * kernel.double()).sum(0) / 128
    torch.testing.assert_close(sae.threshold.grad.double(), d_jump + d_l0, rtol=1e-4, atol=1e-4)
    assert kernel.any()  # the test exercises the kernel
    # inputs get the plain JumpReLU gradient: g * 1[z > theta] through the encoder
    torch.testing.assert_close(sae.b_enc.grad.double(), (g_out.double() * (z > theta)).sum(0), rtol=1e-4, atol=1e-4)
    sae.threshold.data.fill_(-1.0)
    sae.after_optimizer_step()
    assert (sae.threshold > 0).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_input_scale_preserves_the_function(arch):
    sae = make(arch)
    if arch == "batchtopk":
        sae.train()
        sae(x_batch(64) * 3.0)
    sae.eval()
    s = 3.0
    x = x_batch(40, seed=5)
    before_f = sae.encode(s * x)
    before = sae.decode(before_f) / s
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(s)
    torch.testing.assert_close(folded.encode(x), before_f / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.decode(folded.encode(x)), before, rtol=1e-5, atol=1e-5)
    if sae.unit_norm_decoder:
        torch.testing.assert_close(folded.W_dec, sae.W_dec)  # decoder untouched


def test_resample_dead_latents():
    sae = make("standard", dead_tokens=5)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = x_batch(64)
    x_hat, f, aux = sae(x)
    (reconstruction_loss(x, x_hat) + aux["sparsity"]).backward()
    opt.step()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[:7] = True
    sae.tokens_since_fired[dead] = 10
    old = sae.W_dec.detach().clone()
    n = sae.resample_dead(x, opt, torch.Generator().manual_seed(0))
    assert n == 7
    assert not torch.equal(sae.W_dec[:7], old[:7]) and torch.equal(sae.W_dec[7:], old[7:])
    torch.testing.assert_close(sae.W_dec[:7].norm(dim=1), torch.ones(7))
    assert (opt.state[sae.W_dec]["exp_avg"][:7] == 0).all() and (opt.state[sae.W_enc]["exp_avg_sq"][:, :7] == 0).all()
    assert (sae.tokens_since_fired == 0).all() or not sae.dead_mask()[:7].any()
