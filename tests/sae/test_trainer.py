"""Training loop: schedules, learning on planted data, several SAEs per stream, exact resume."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.errors import UserError
from refusal_lens.sae import SAEConfig, TensorStream, TrainConfig, Trainer, create_sae, load_sae
from refusal_lens.sae.evaluate import reconstruction_metrics

D, M = 16, 48


def planted(n: int = 4096, n_feat: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative combinations of ``n_feat`` unit directions, plus an offset and a scale."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, D, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    x = (active * (0.5 + torch.rand(n, n_feat, generator=g))) @ feats
    return 7.0 * (x + 0.2), feats


def make_saes(archs, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {a: create_sae(SAEConfig(arch=a, d_in=D, width=M, k=3, dead_tokens=2048, **kw), g) for a in archs}


def tcfg(**kw) -> TrainConfig:
    base = dict(tokens=64 * 60, batch_size=64, progress=False, log_every=20, lr=3e-3, resample_every=25)
    base.update(kw)
    return TrainConfig(**base)


def test_schedules():
    t = Trainer(make_saes(["topk"]), TensorStream(planted()[0], 64), tcfg(tokens=64 * 100, lr_warmup_frac=0.1))
    assert t.n_steps == 100
    assert t.lr_factor(0) == pytest.approx(0.1) and t.lr_factor(9) == 1.0 and t.lr_factor(50) == 1.0
    assert t.lr_factor(80) == pytest.approx(1.0) and t.lr_factor(90) == pytest.approx(0.5)
    assert t.penalty_factor(0) == pytest.approx(0.2) and t.penalty_factor(4) == 1.0


def test_input_scale_is_estimated_and_folded(tmp_path):
    x, _ = planted()
    t = Trainer(make_saes(["topk"]), TensorStream(x, 64), tcfg(), out_dir=tmp_path)
    out = t.run()["topk"]
    probe = x[: 64 * 8].double().norm(dim=1).mean()
    assert t.scale == pytest.approx(float(D**0.5 / probe), rel=1e-6)
    # the saved SAE works on raw activations and equals the returned folded copy
    loaded = load_sae(tmp_path, d_model=D)
    assert torch.equal(loaded.encode(x[:100]), out.encode(x[:100]))
    assert (tmp_path / "training_log.jsonl").read_text().count("\n") >= 3


@pytest.mark.parametrize("arch", ["standard", "april", "gated", "topk", "batchtopk", "jumprelu"])
def test_training_reduces_error(arch):
    x, _ = planted()
    saes = make_saes([arch])
    before = reconstruction_metrics(saes[arch].eval(), TensorStream(x, 256), 1024)["fvu"]
    out = Trainer(saes, TensorStream(x, 64, shuffle=True), tcfg(tokens=64 * 100)).run()[arch]
    after = reconstruction_metrics(out, TensorStream(x, 256), 1024)
    assert after["fvu"] < min(0.6, 0.8 * before), (before, after)
    if arch in ("topk",):
        assert after["l0"] <= 3.0 + 1e-9


def test_several_saes_on_one_stream_equal_separate_runs():
    x, _ = planted()
    together = Trainer(make_saes(["topk", "gated"]), TensorStream(x, 64), tcfg()).run()
    alone = Trainer({"gated": make_saes(["topk", "gated"])["gated"]}, TensorStream(x, 64), tcfg()).run()
    for name, p in together["gated"].state_dict().items():
        assert torch.equal(p, alone["gated"].state_dict()[name]), name


@pytest.mark.parametrize("archs", [["topk", "standard"], ["batchtopk", "jumprelu"]])
def test_resume_continues_exactly(tmp_path, archs):
    x, _ = planted()
    cfg = tcfg(tokens=64 * 20, checkpoint_every=5)
    full = Trainer(make_saes(archs), TensorStream(x, 64, shuffle=True), cfg, out_dir=tmp_path / "a").run()
    # interrupted after 12 steps (the last checkpoint is at step 10), then resumed by a new process-like trainer
    Trainer(make_saes(archs), TensorStream(x, 64, shuffle=True), cfg, out_dir=tmp_path / "b").run(max_steps=12)
    other_seed_init = make_saes(archs, seed=99)  # resume must overwrite everything, including the init
    resumed_trainer = Trainer(other_seed_init, TensorStream(x, 64, shuffle=True), cfg, out_dir=tmp_path / "b")
    resumed = resumed_trainer.run(resume=True)
    for a in archs:
        sd_full, sd_res = full[a].state_dict(), resumed[a].state_dict()
        for name in sd_full:
            assert torch.equal(sd_full[name], sd_res[name]), (a, name)
    assert (tmp_path / "b" / "standard" / "cfg.json").exists() or (tmp_path / "b" / "jumprelu" / "cfg.json").exists()


def test_resume_without_checkpoint_starts_afresh_and_corrupt_checkpoint_is_clear(tmp_path):
    x, _ = planted()
    t = Trainer(make_saes(["topk"]), TensorStream(x, 64), tcfg(tokens=64 * 3), out_dir=tmp_path)
    t.run(resume=True)  # nothing to resume: trains from scratch
    ckpt = tmp_path / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint"):
        Trainer(make_saes(["topk"]), TensorStream(x, 64), tcfg(), out_dir=tmp_path).run(resume=True)


def test_width_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="d_in"):
        Trainer(make_saes(["topk"]), TensorStream(torch.randn(256, D + 1), 64), tcfg())


def test_resume_with_a_model_backed_stream(llama, tokenizer, tmp_path):
    """The data position (chunk start + batches served) is restored too: same result as uninterrupted."""
    from refusal_lens.sae.source import ActivationSource, DataConfig

    texts = ["how do i bake bread at home . write a poem about the sea .", "explain how plants grow . sure ."]
    chats = [[{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four ."}]]

    def stream():
        cfg = DataConfig(data="mix:0.5", model_batch_size=4, buffer_tokens=80)
        return ActivationSource(llama, tokenizer, 1, "resid_pre", cfg, 32, texts, chats)

    def saes():
        return {"topk": create_sae(SAEConfig(arch="topk", d_in=32, width=64, k=4), torch.Generator().manual_seed(0))}

    cfg = TrainConfig(tokens=32 * 9, batch_size=32, progress=False, checkpoint_every=3, norm_batches=2)
    full = Trainer(saes(), stream(), cfg, out_dir=tmp_path / "a").run()["topk"]
    Trainer(saes(), stream(), cfg, out_dir=tmp_path / "b").run(max_steps=5)
    resumed = Trainer(saes(), stream(), cfg, out_dir=tmp_path / "b").run(resume=True)["topk"]
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
