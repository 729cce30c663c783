"""Our saved SAEs loaded by the real SAELens and sparsify packages give the same encodings.

Both packages are optional (``pip install -e .[interop]``, installed without replacing torch, see README);
each test skips with the reason when its package is absent.
"""

from __future__ import annotations

import pytest
import torch

from refusal_lens.sae import ARCHITECTURES, save_saelens, save_sparsify

from .test_formats import trained_like

D, M = 16, 48
X = torch.randn(64, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_loads_our_files(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e .[interop])")
    ours = trained_like(arch, D, M, k=6)
    save_saelens(ours, tmp_path, {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_pre"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(X), ours.encode(X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(X)), ours.decode(ours.encode(X)), rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"


def test_sparsify_loads_our_files(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e .[interop])")
    if not hasattr(sparsify, "SparseCoder"):
        pytest.skip("the installed 'sparsify' is not EleutherAI's (that one is published as eai-sparsify)")
    ours = trained_like("topk", D, M, k=6)
    folder = save_sparsify(ours, tmp_path / "layers.1")
    theirs = sparsify.SparseCoder.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        out = theirs.encode(X)
        dense = torch.zeros(X.shape[0], M).scatter(-1, out.top_indices, out.top_acts)
        torch.testing.assert_close(dense, ours.encode(X), rtol=1e-5, atol=1e-5)
        recon = theirs.decode(out.top_acts, out.top_indices)
        torch.testing.assert_close(recon, ours.decode(ours.encode(X)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "gated", "topk", "jumprelu"])
def test_we_load_files_saelens_wrote(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e .[interop])")
    from refusal_lens.sae import load_sae

    ours = trained_like(arch, D, M, k=6)
    save_saelens(ours, tmp_path / "ours", {"hook_name": "blocks.2.hook_mlp_out"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    theirs.save_model(tmp_path / "theirs")
    again = load_sae(tmp_path / "theirs", d_model=D)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(X), theirs.encode(X), rtol=1e-5, atol=1e-5)
    assert again.metadata["hook_name"] == "blocks.2.hook_mlp_out"


def test_sparsify_loads_what_sae_export_writes(tmp_path):
    """`refusal-lens sae export --format sparsify` (the console script) writes what sparsify itself loads."""
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e .[interop])")
    if not hasattr(sparsify, "SparseCoder"):
        pytest.skip("the installed 'sparsify' is not EleutherAI's (that one is published as eai-sparsify)")
    from ..cli.console import run_cli

    ours = trained_like("topk", D, M, k=6)
    save_saelens(ours, tmp_path / "trained", {"model_name": "tiny", "hook_name": "blocks.3.hook_resid_pre"})
    done = run_cli("sae", "export", "--sae", "trained", "--format", "sparsify", "--out", "exported", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "exported" / "layers.2", device="cpu")  # resid_pre 3
    with torch.no_grad():
        out = theirs.encode(X)
        dense = torch.zeros(X.shape[0], M).scatter(-1, out.top_indices, out.top_acts)
        torch.testing.assert_close(dense, ours.encode(X), rtol=1e-5, atol=1e-5)
