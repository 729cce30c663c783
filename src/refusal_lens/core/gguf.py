"""GGUF model files: find them, describe them for provenance, and load them as plain HF models.

A GGUF file (llama.cpp's format) holds a quantized model and its tokenizer. transformers reads it with
``from_pretrained(folder, gguf_file=name)`` (this needs the ``gguf`` package) and *dequantizes* every
tensor, so the loaded model is an ordinary float model: hooks, weight edits and ``save_pretrained`` all work.
We load with ``GgufConfig(dequantize=True)`` so the model carries no quantization config and saves as a
normal checkpoint (without it ``save_pretrained`` refuses: "quantized with gguf and is not serializable").

Dequantizing is slow (SmolLM2-135M: ~18 s, Gemma-3 270M: ~55 s on one CPU thread), so the first load of a
file writes the dequantized float32 checkpoint into the user cache (:func:`cache_dir`), keyed by the file's
sha256 and the transformers version; later loads read that folder (~1 s) and cast to ``--dtype``. The
cached folder's weights are bit-identical to a direct GGUF load (tests/real/test_real_models.py checks).

Provenance (:func:`describe_gguf`) records the file, its sha256, llama.cpp's file type (``MOSTLY_Q4_1``...)
and the count of tensors per quantization type, read from the header by a small parser (the ``gguf``
package's reader parses all 262k Gemma vocabulary entries into numpy objects: ~15 s; this takes ~0.3 s).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import UserError

GGUF_SUFFIX = ".gguf"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def cache_dir() -> Path:
    """Where refusal-lens keeps files it derives from installed packages (``$REFUSAL_LENS_CACHE`` or
    ``~/.cache/refusal-lens``); never inside site-packages."""
    env = os.environ.get("REFUSAL_LENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal-lens"


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the single ``.gguf`` in a folder without config.json.

    Returns None for anything else (a HF folder, a hub id); raises when a folder holds several GGUF files.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.suffix.lower() == GGUF_SUFFIX else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise UserError(f"model folder {p} holds {len(found)} GGUF files ({names}); pass --model FOLDER/NAME.gguf.")
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------- header
class _Reader:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise UserError(f"GGUF file {self.path} is truncated or corrupt (header ends early).") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise UserError(f"GGUF file {self.path} is truncated or corrupt (a string runs past the end).")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int, keep_arrays: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            elem, n = self.unpack("<I"), self.unpack("<Q")
            if elem in _SCALARS and not keep_arrays:  # skip fixed-size arrays without reading them
                self.pos += n * struct.calcsize(_SCALARS[elem])
                return f"<array of {n}>"
            items = [self.value(elem, keep_arrays) for _ in range(n)]
            return items if keep_arrays else f"<array of {n}>"
        raise UserError(f"GGUF file {self.path} has an unknown value type {kind}; is it a GGUF file?")


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The metadata (arrays summarised as ``"<array of N>"``) and ``(tensor name, ggml type id)`` list."""
    p = Path(path)
    with open(p, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UserError(f"{p} is not a GGUF file (no GGUF magic bytes); pass a .gguf model or a HF folder.")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf, p)
            r.pos = 4
            version = r.unpack("<I")
            if version < 2:
                raise UserError(f"GGUF file {p} is version {version}; only GGUF v2 and later are supported.")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            meta: dict[str, Any] = {"GGUF.version": version}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.unpack("<I"), keep_arrays=False)
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                r.pos += 8 * n_dims
                tensors.append((name, r.unpack("<I")))
                r.pos += 8  # data offset
    return meta, tensors


def _enum_name(enum_name: str, value: int) -> str:
    """llama.cpp's name for a type id, from the gguf package when installed (else the number)."""
    try:
        import gguf

        return getattr(gguf, enum_name)(value).name
    except Exception:  # gguf absent, or an id newer than the installed package
        return str(value)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_gguf(path: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """Provenance of a GGUF file: path, sha256, architecture, file type and tensor quantization types."""
    p = Path(path).resolve()
    meta, tensors = read_gguf_header(p)
    file_type = meta.get("general.file_type")
    types = Counter(_enum_name("GGMLQuantizationType", t) for _, t in tensors)
    return {
        "gguf_file": str(p),
        "sha256": sha256 or sha256_file(p),
        "size_bytes": p.stat().st_size,
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "quantization": None if file_type is None else _enum_name("LlamaFileType", int(file_type)),
        "tensor_types": dict(types.most_common()),
    }


# ----------------------------------------------------------------------------------------------- loading
def _require_gguf_package() -> None:
    """transformers reads GGUF files with the gguf package, and (in 5.x) insists on accelerate for them."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"loading a .gguf model needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            '(or pip install -e ".[real]").'
        )


def _load_direct(path: Path, dtype: Any) -> tuple[Any, Any]:
    """Tokenizer and dequantized model straight from the GGUF file (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _require_gguf_package()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    return model, tokenizer


def converted_dir(sha256: str) -> Path:
    import transformers

    return cache_dir() / "converted" / f"{sha256[:16]}-transformers{transformers.__version__}"


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write the dequantized float32 model and tokenizer in ``path`` as a new HF folder ``out``.

    Built in a temporary folder beside ``out`` and renamed into place, so a crash leaves no half folder;
    if another process wrote ``out`` meanwhile, its copy is kept. An existing ``out`` is never replaced.
    """
    import shutil
    import tempfile

    import torch

    p, target = Path(path), Path(out)
    if target.exists():
        raise UserError(f"output folder {target} already exists; choose another folder or remove it.")
    info = info or describe_gguf(p)
    model, tokenizer = _load_direct(p, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        (stage / "refusal_lens_gguf.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(stage, 0o755)
        try:
            os.rename(stage, target)  # fails if target appeared meanwhile (another process converted it)
        except OSError:
            if not (target / "refusal_lens_gguf.json").is_file():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def gguf_checkpoint(path: str | os.PathLike, use_cache: bool = True) -> tuple[Path, dict[str, Any]]:
    """A HF folder holding ``path``'s dequantized weights (converted once into the cache), and its provenance.

    With ``use_cache=False``, or when the cache folder cannot be written, returns the GGUF file itself.
    """
    p = Path(path).expanduser().resolve()
    info = describe_gguf(p)
    if not use_cache:
        return p, info
    target = converted_dir(info["sha256"])
    stamp = target / "refusal_lens_gguf.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == info["sha256"]:
        return target, info
    if target.exists():  # an unfinished or foreign folder: leave it alone, load from the file
        return p, info
    try:
        convert_gguf(p, target, info)
    except OSError:  # a read-only home: load from the GGUF file every time instead
        return p, info
    return target, info


def gguf_from_pretrained_args(path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Where and how to ``from_pretrained`` a GGUF model: ``(folder, extra kwargs, provenance)``.

    The cached converted folder (no extra kwargs) when there is one, else the file's folder with
    ``gguf_file`` and a dequantizing ``GgufConfig``.
    """
    found, info = gguf_checkpoint(path)
    if found.is_dir():
        return found, {}, info
    from transformers import GgufConfig

    _require_gguf_package()
    return found.parent, {"gguf_file": found.name, "quantization_config": GgufConfig(dequantize=True)}, info
