"""Round trips through our writers and readers of files built to each foreign format's specification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from refusal_lens.core.errors import UserError
from refusal_lens.sae import ARCHITECTURES, SAEConfig, create_sae, load_sae, save_saelens, save_sparsify
from refusal_lens.sae.formats import detect_format

D, M = 12, 40


def trained_like(arch: str, d: int = D, width: int = M, k: int = 5):
    """An SAE whose biases and thresholds are non-zero, as after training (a BatchTopK threshold is fitted)."""
    sae = create_sae(SAEConfig(arch=arch, d_in=d, width=width, k=k), torch.Generator().manual_seed(0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=g))
    if arch == "batchtopk":
        sae.train()
        sae(torch.randn(64, d, generator=g))
    return sae.eval()


X = torch.randn(50, D, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_round_trip(arch, tmp_path):
    sae = trained_like(arch)
    save_saelens(sae, tmp_path, {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_pre", "data_mix": "chat"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations"):
        assert key in cfg
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    assert cfg["architecture"] == {"april": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    if arch == "topk":
        assert cfg["k"] == 5
    loaded = load_sae(tmp_path, d_model=D)
    assert type(loaded) is type(sae)
    exported, again = sae.export_tensors(), loaded.export_tensors()
    assert exported.keys() == again.keys()
    for name in exported:
        assert torch.equal(exported[name], again[name]), name
    assert torch.equal(loaded.encode(X), sae.encode(X))
    assert torch.equal(loaded.decode(loaded.encode(X)), sae.decode(sae.encode(X)))
    assert loaded.metadata["hook_name"] == "blocks.1.hook_resid_pre"


def test_saelens_pre6_flat_config(tmp_path):
    sae = trained_like("topk")
    save_file({k: v.contiguous() for k, v in sae.export_tensors().items()}, str(tmp_path / "sae_weights.safetensors"))
    flat = {
        "d_in": D,
        "d_sae": M,
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "model_name": "m",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(flat))
    loaded = load_sae(tmp_path)
    assert loaded.arch == "topk" and loaded.k == 5 and loaded.metadata["format"] == "saelens-pre6"
    assert loaded.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert torch.equal(loaded.encode(X), sae.encode(X))


def ref_topk(x, W_enc, b_enc, b_dec, k):
    z = torch.relu((x.double() - b_dec.double()) @ W_enc.double() + b_enc.double())
    v, i = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, i, v)


def test_sparsify_layout_read_and_write(tmp_path):
    g = torch.Generator().manual_seed(3)
    enc_w, enc_b = torch.randn(M, D, generator=g), torch.randn(M, generator=g) * 0.1
    W_dec, b_dec = torch.randn(M, D, generator=g), torch.randn(D, generator=g) * 0.1
    folder = tmp_path / "layers.4"
    folder.mkdir()
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 3,
                "normalize_decoder": True,
                "num_latents": M,
                "k": 6,
                "multi_topk": False,
                "d_in": D,
            }
        )
    )
    assert detect_format(folder) == "sparsify"
    sae = load_sae(folder, d_model=D)
    assert sae.metadata["hook_name"] == "blocks.4.hook_resid_post"  # sparsify layers.N = block N output
    torch.testing.assert_close(sae.encode(X).double(), ref_topk(X, enc_w.T, enc_b, b_dec, 6), rtol=1e-5, atol=1e-5)
    out = save_sparsify(sae, tmp_path / "again" / "layers.4")
    again = load_sae(out)
    assert torch.equal(again.encode(X), sae.encode(X))
    with pytest.raises(UserError, match="several hookpoints"):
        (tmp_path / "again" / "layers.5").mkdir()
        save_sparsify(sae, tmp_path / "again" / "layers.5")
        load_sae(tmp_path / "again")
    with pytest.raises(UserError, match="TopK"):
        save_sparsify(trained_like("gated"), tmp_path / "g")


def _dl_files(tmp_path, state, trainer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    return tmp_path


def test_dictionary_learning_classes(tmp_path):
    g = torch.Generator().manual_seed(4)
    enc_w, enc_b = torch.randn(M, D, generator=g), torch.randn(M, generator=g) * 0.1
    dec_w, bias = torch.randn(D, M, generator=g), torch.randn(D, generator=g) * 0.1
    x = X.double()
    # AutoEncoder: f = ReLU(encoder(x - bias)), x_hat = decoder(f) + bias
    p = _dl_files(
        tmp_path / "ae",
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "bias": bias},
        {"dict_class": "AutoEncoder", "lm_name": "m", "layer": 2},
    )
    sae = load_sae(p, d_model=D)
    f_ref = torch.relu((x - bias.double()) @ enc_w.T.double() + enc_b.double())
    torch.testing.assert_close(sae.encode(X).double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sae.decode(sae.encode(X)).double(), f_ref @ dec_w.T.double() + bias.double(), rtol=1e-5, atol=1e-5
    )
    # AutoEncoderTopK: k stored as a buffer
    p = _dl_files(
        tmp_path / "tk",
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": bias, "k": torch.tensor(4)},
        {"dict_class": "AutoEncoderTopK"},
    )
    torch.testing.assert_close(
        load_sae(p).encode(X).double(), ref_topk(X, enc_w.T, enc_b, bias, 4), rtol=1e-5, atol=1e-5
    )
    # BatchTopKSAE: one global threshold at inference
    p = _dl_files(
        tmp_path / "btk",
        {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
            "b_dec": bias,
            "k": torch.tensor(4),
            "threshold": torch.tensor(0.3),
        },
        {"dict_class": "BatchTopKSAE"},
    )
    z = torch.relu((x - bias.double()) @ enc_w.T.double() + enc_b.double())
    torch.testing.assert_close(load_sae(p).encode(X).double(), z * (z > 0.3), rtol=1e-5, atol=1e-5)
    # GatedAutoEncoder
    r_mag, gate_b, mag_b = (torch.randn(M, generator=g) * 0.1 for _ in range(3))
    p = _dl_files(
        tmp_path / "gated",
        {
            "encoder.weight": enc_w,
            "decoder.weight": dec_w,
            "decoder_bias": bias,
            "r_mag": r_mag,
            "gate_bias": gate_b,
            "mag_bias": mag_b,
        },
        {"dict_class": "GatedAutoEncoder"},
    )
    h = (x - bias.double()) @ enc_w.T.double()
    f_ref = (h + gate_b.double() > 0) * torch.relu(h * r_mag.double().exp() + mag_b.double())
    torch.testing.assert_close(load_sae(p).encode(X).double(), f_ref, rtol=1e-5, atol=1e-5)
    # JumpReluAutoEncoder: SAELens-shaped tensors, no input centring
    W_enc, thr = torch.randn(D, M, generator=g), torch.rand(M, generator=g) * 0.5
    p = _dl_files(
        tmp_path / "jr",
        {"W_enc": W_enc, "b_enc": enc_b, "W_dec": dec_w.T.contiguous(), "b_dec": bias, "threshold": thr},
        {"dict_class": "JumpReluAutoEncoder"},
    )
    pre = x @ W_enc.double() + enc_b.double()
    torch.testing.assert_close(
        load_sae(p / "ae.pt").encode(X).double(), pre * (pre > thr.double()), rtol=1e-5, atol=1e-5
    )


def test_dictionary_learning_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"encoder.weight": torch.zeros(2, 2), "x": Evil()}, tmp_path / "ae.pt")
    with pytest.raises(UserError, match="weights-only"):
        load_sae(tmp_path)


def test_gemma_scope_npz(tmp_path):
    g = torch.Generator().manual_seed(5)
    W_enc, W_dec = torch.randn(D, M, generator=g), torch.randn(M, D, generator=g)
    b_enc, b_dec, thr = torch.randn(M, generator=g) * 0.1, torch.randn(D, generator=g), torch.rand(M, generator=g)
    np.savez(
        tmp_path / "params.npz",
        W_enc=W_enc.numpy(),
        W_dec=W_dec.numpy(),
        b_enc=b_enc.numpy(),
        b_dec=b_dec.numpy(),
        threshold=thr.numpy(),
    )
    sae = load_sae(tmp_path / "params.npz", d_model=D)
    pre = X.double() @ W_enc.double() + b_enc.double()  # Gemma Scope does not subtract b_dec
    f_ref = pre * (pre > thr.double())
    torch.testing.assert_close(sae.encode(X).double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sae.decode(sae.encode(X)).double(), f_ref @ W_dec.double() + b_dec.double(), rtol=1e-5, atol=1e-5
    )
    save_saelens(sae, tmp_path / "as_saelens")
    assert torch.equal(load_sae(tmp_path / "as_saelens").encode(X), sae.encode(X))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="npz"):
        load_sae(tmp_path / "bad.npz")


def test_clear_errors(tmp_path):
    sae = trained_like("topk")
    save_saelens(sae, tmp_path / "ok")
    with pytest.raises(UserError, match="d_model is 99"):
        load_sae(tmp_path / "ok", d_model=99)
    with pytest.raises(UserError, match="does not exist"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no SAE files"):
        load_sae(tmp_path / "empty")
    bad = tmp_path / "corrupt"
    save_saelens(sae, bad)
    data = (bad / "sae_weights.safetensors").read_bytes()
    (bad / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_sae(bad)
    save_saelens(sae, bad)
    (bad / "cfg.json").write_text("{truncated")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(bad)
    save_saelens(sae, bad)
    t = sae.export_tensors()
    del t["b_enc"]
    save_file(t, str(bad / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="b_enc"):
        load_sae(bad)
    t = sae.export_tensors()
    t["b_dec"] = torch.zeros(D + 1)
    save_file(t, str(bad / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="shape"):
        load_sae(bad)
    t = sae.export_tensors()
    t["W_dec"][0, 0] = float("nan")
    save_file(t, str(bad / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="NaN"):
        load_sae(bad)
    save_saelens(sae, bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["d_sae"] = M + 1
    (bad / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="mixes two SAEs"):
        load_sae(bad)
