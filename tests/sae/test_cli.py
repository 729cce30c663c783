"""``sae train`` / ``sae eval`` end to end on a saved tiny Llama, through the argparse front end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from refusal_lens.cli.sae_train_eval import add_eval_arguments, add_train_arguments, main
from refusal_lens.sae import load_sae


@pytest.fixture
def data_file(tmp_path):
    rows = [
        {"text": "how do i bake bread at home . write a poem about the sea ."},
        {"text": "explain how plants grow . give me three tips for travel ."},
        {"instruction": "write a poem about the sea", "reply": "sure , here is a short story ."},
        {
            "messages": [
                {"role": "user", "content": "what is two plus two ?"},
                {"role": "assistant", "content": "i am sorry , but i cannot help ."},
            ]
        },
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_help_comes_from_the_dataclass_fields():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    text = parser.format_help()
    assert "active latents per token" in text and "--penalty-warmup-frac" in text and "--data-seed" in text
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert "--ce-docs" in parser.format_help()


def test_train_then_eval(saved_model, data_file, tmp_path, capsys):
    out = tmp_path / "sae"
    common = ["--model", str(saved_model), "--data-file", str(data_file), "--data", "mix:0.5"]
    rc = main(
        [
            "train",
            *common,
            "--layer",
            "2",
            "--arch",
            "topk,jumprelu",
            "--width",
            "64",
            "--k",
            "4",
            "--tokens",
            "256",
            "--batch-size",
            "32",
            "--buffer-tokens",
            "128",
            "--norm-batches",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for arch in ("topk", "jumprelu"):
        cfg = json.loads((out / arch / "cfg.json").read_text())
        meta = cfg["metadata"]
        assert meta["hook_name"] == "blocks.2.hook_resid_pre" and meta["hf_module_path"] == "model.layers.2"
        assert meta["data_mix"] == "mix:0.5" and "<|assistant|>" in meta["chat_template"]
        assert load_sae(out / arch, d_model=32).arch == arch
    metrics = tmp_path / "m.json"
    rc = main(
        [
            "eval",
            *common,
            "--sae",
            str(out / "topk"),
            "--eval-tokens",
            "64",
            "--eval-batch-size",
            "32",
            "--ce-docs",
            "4",
            "--out",
            str(metrics),
        ]
    )
    assert rc == 0
    m = json.loads(metrics.read_text())
    assert m["layer"] == 2 and m["site"] == "resid_pre" and m["l0"] <= 4 and "ce_recovered_zero" in m
    assert "fvu" in capsys.readouterr().out


def test_user_errors_exit_2(saved_model, data_file, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--model",
            str(saved_model),
            "--data-file",
            str(data_file),
            "--layer",
            "2",
            "--arch",
            "bogus",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "bogus" in capsys.readouterr().out
    rc = main(["eval", "--model", str(saved_model), "--data-file", str(data_file), "--sae", str(tmp_path / "none")])
    assert rc == 2 and "does not exist" in capsys.readouterr().out


def test_activation_cache_is_reused_and_checked(saved_model, data_file, tmp_path, capsys):
    common = [
        "--model",
        str(saved_model),
        "--data-file",
        str(data_file),
        "--width",
        "32",
        "--k",
        "4",
        "--tokens",
        "128",
        "--batch-size",
        "32",
        "--norm-batches",
        "1",
        "--no-progress",
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(["train", *common, "--layer", "1", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "cache" / "index.json").exists()
    assert main(["train", *common, "--layer", "1", "--arch", "batchtopk", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", *common, "--layer", "2", "--out", str(tmp_path / "c")]) == 2
    assert "activation cache" in capsys.readouterr().out


def test_cache_tokens_sets_the_cache_size_and_training_cycles_through_it(saved_model, data_file, tmp_path, capsys):
    """--cache-tokens 64 with --tokens 128: the cache holds 64 activations, training reads 128 (two passes)."""
    common = ["--model", str(saved_model), "--data-file", str(data_file), "--width", "32", "--k", "4", "--tokens",
              "128", "--batch-size", "32", "--norm-batches", "1", "--no-progress", "--log-every", "1",
              "--layer", "1"]  # fmt: skip
    assert main(["train", *common, "--cache-tokens", "64", "--out", str(tmp_path / "x")]) == 2  # no --cache
    assert "--cache" in capsys.readouterr().out
    cache = tmp_path / "cache"
    assert main(["train", *common, "--cache", str(cache), "--cache-tokens", "64", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((cache / "index.json").read_text())["n_tokens"] == 64
    log = [json.loads(line) for line in (tmp_path / "a" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["tokens"] == 128


def test_sae_export_round_trips_through_the_console_script(tmp_path):
    """sae export writes sparsify's layout under the hookpoint of the SAE's site, and it reads back identically."""
    from refusal_lens.sae import load_sae, save_saelens

    from ..cli.console import run_cli
    from .test_formats import trained_like

    ours = trained_like("topk", 16, 48, k=6)
    save_saelens(ours, tmp_path / "trained", {"model_name": "tiny", "hook_name": "blocks.3.hook_resid_pre"})
    done = run_cli("sae", "export", "--sae", "trained", "--format", "sparsify", "--out", "exported", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(tmp_path / "exported").as_posix() for p in (tmp_path / "exported").rglob("*"))
    assert files == ["layers.2", "layers.2/cfg.json", "layers.2/sae.safetensors"]
    again = load_sae(tmp_path / "exported" / "layers.2", d_model=16)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    gated = trained_like("gated", 16, 48, k=6)
    save_saelens(gated, tmp_path / "gated", {"hook_name": "blocks.3.hook_resid_pre"})
    refused = run_cli("sae", "export", "--sae", "gated", "--format", "sparsify", "--out", "g", cwd=tmp_path)
    assert refused.returncode == 2 and "TopK" in refused.stderr and not (tmp_path / "g").exists()
