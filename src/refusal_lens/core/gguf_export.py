"""Write an edited model as GGUF again, when it was loaded from a GGUF file (``--model smollm2``, ``file.gguf``).

The input file is the template: its metadata (tokenizer, chat template, hyper-parameters) is copied as it is,
and so is every tensor the edit left alone, as its raw (quantized) bytes. A tensor is written anew exactly when
the model's weights differ from what the file dequantizes to, so nothing changed can be missed: every tensor of
the file is dequantized, brought to the HF layout and compared bit for bit with the model's (the same
dequantization transformers uses when it loads the file, so an unedited tensor compares equal). Changed tensors
are stored in F32 (exact: the HF model is float32) or F16 (half the size; rounding changes the logits by
~1e-3). One-dimensional tensors (norms, biases) are always F32, as llama.cpp expects.

Layout between the two formats (what llama.cpp's converter does and transformers undoes on load):

* Llama: the rows of ``attn_q``/``attn_k`` are permuted per head. HF's rotary embedding pairs dimension ``j``
  with ``j + d_head/2`` of each head ("rotate half"); llama.cpp pairs ``2j`` with ``2j+1``. The file's row
  ``2j + t`` of a head is HF's row ``t·d_head/2 + j`` (``t ∈ {0, 1}``). ``attn_k`` uses the KV head count.
* Gemma-2/3: RMSNorm weights are stored as ``1 + w`` (HF's Gemma norm multiplies by ``1 + w``; llama.cpp's by
  the stored value).
* Other architectures: the tensors are the same; only the families listed in :data:`LAYOUTS` are written, since
  a family with another convention would be written wrong without an error.

A model with tied embeddings whose embedding was edited is untied (``direction/orthogonalize.py``): the file
then gains an ``output.weight``; when the unembedding is unchanged it is the original ``token_embd`` bytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .gguf import sha256_file
from .io import atomic_path

# Architectures (GGUF ``general.architecture``) whose HF <-> GGUF tensor layout this module knows.
LAYOUTS = {
    "llama": "permute_qk",
    "qwen2": "same",
    "qwen3": "same",
    "gemma2": "norm_plus_one",
    "gemma3": "norm_plus_one",
}
DTYPES = ("f32", "f16")


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file ``model`` was loaded from (for ``smollm2-safe``: its base's), or None."""
    info = getattr(model, "refusal_lens_gguf", None)
    return Path(info["gguf_file"]) if info else None


def _head_permutation(rows: int, n_head: int) -> np.ndarray:
    """``perm`` with ``file_rows = hf_rows[perm]``: row ``2j + t`` of a head in the file is HF's ``t·half + j``."""
    d_head = rows // n_head
    half = d_head // 2
    j, t = np.divmod(np.arange(d_head), 2)
    within = t * half + j
    return (np.arange(n_head)[:, None] * d_head + within[None, :]).reshape(-1)


class _Layout:
    def __init__(self, arch: str, fields: dict[str, Any]):
        if arch not in LAYOUTS:
            raise UserError(
                f"writing an edited GGUF for architecture {arch!r} is not supported (known: {', '.join(LAYOUTS)}); "
                "use the merged HF checkpoint, or pass --gguf none."
            )
        self.kind = LAYOUTS[arch]
        self.n_head = fields.get(f"{arch}.attention.head_count")
        self.n_kv = fields.get(f"{arch}.attention.head_count_kv", self.n_head)

    def _perm(self, name: str, rows: int) -> np.ndarray | None:
        if self.kind != "permute_qk" or not (".attn_q." in name or ".attn_k." in name):
            return None
        n = self.n_head if ".attn_q." in name else self.n_kv
        if not isinstance(n, int) or rows % (2 * n):
            raise UserError(f"GGUF tensor {name}: cannot undo llama.cpp's head permutation (heads {n}, rows {rows}).")
        return _head_permutation(rows, n)

    def to_hf(self, name: str, array: np.ndarray) -> np.ndarray:
        perm = self._perm(name, array.shape[0])
        if perm is not None:
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            array = array[inverse]
        if self.kind == "norm_plus_one" and name.endswith("norm.weight"):
            array = array - 1
        return array

    def to_file(self, name: str, array: np.ndarray) -> np.ndarray:
        perm = self._perm(name, array.shape[0])
        if perm is not None:
            array = array[perm]
        if self.kind == "norm_plus_one" and name.endswith("norm.weight"):
            array = array + 1
        return np.ascontiguousarray(array)


def _hf_names(model: nn.Module, arch: str, n_blocks: int) -> dict[str, tuple[str, torch.Tensor]]:
    """``{gguf tensor name: (state-dict key, tensor)}`` through the gguf package's HF -> GGUF name map."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise UserError(f"the installed gguf package does not know architecture {arch!r}; pip install -U gguf")
    name_map = gguf.get_tensor_name_map(arch_id, n_blocks)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in model.state_dict().items():
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(key)
        else:
            out[name] = (key, tensor)
    if unmapped:
        raise UserError(
            f"model tensors {unmapped[:3]} have no GGUF name in a {arch} file of {n_blocks} blocks; the model is not "
            "the GGUF file's, so its edit cannot be written into that file."
        )
    return out


def _field_values(reader: Any) -> dict[str, Any]:
    import gguf

    return {k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != gguf.GGUFValueType.ARRAY}


def _copy_metadata(reader: Any, writer: Any) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        main = gguf.GGUFValueType(field.types[0])
        sub = None
        if main == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise UserError(f"GGUF key {key} is a nested array, which this writer does not copy.")
            sub = gguf.GGUFValueType(field.types[1])
        value = field.contents()
        if key == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(key, value, main, sub_type=sub)


def write_edited_gguf(
    model: nn.Module, path: str | os.PathLike, dtype: str = "f32", source: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write ``model`` (loaded from GGUF ``source``, then edited) to ``path`` as GGUF; returns what was written.

    ``source`` defaults to the file the model was loaded from (:func:`source_gguf`); its sha256 must still match
    the one recorded at load time.
    """
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"--gguf {dtype} is unknown; choose from {', '.join(DTYPES)}.")
    t0 = time.perf_counter()
    src = Path(source) if source is not None else source_gguf(model)
    if src is None:
        raise UserError("the model was not loaded from a GGUF file, so there is no GGUF to write the edit into.")
    recorded = (getattr(model, "refusal_lens_gguf", None) or {}).get("sha256")
    if source is None and recorded and sha256_file(src) != recorded:
        raise UserError(f"{src} changed since the model was loaded from it (sha256 differs); reload the model.")
    reader = gguf.GGUFReader(str(src))
    fields = _field_values(reader)
    arch = str(fields.get("general.architecture"))
    layout = _Layout(arch, fields)
    params = _hf_names(model, arch, int(fields.get(f"{arch}.block_count", 0)))
    store = np.float32 if dtype == "f32" else np.float16
    written, copied, added = [], 0, []
    originals: dict[str, tuple[Any, np.ndarray]] = {}  # token_embd only: an untied unembedding may equal it
    tensors: list[tuple[str, np.ndarray, Any]] = []  # (name, data, raw dtype or None)
    for t in reader.tensors:
        if t.name not in params:
            raise UserError(f"GGUF tensor {t.name} has no counterpart in the model; cannot write the edit into {src}.")
        _, param = params.pop(t.name)
        original = np.array(layout.to_hf(t.name, gguf.quants.dequantize(t.data, t.tensor_type)))  # own, writable
        if t.name == "token_embd.weight":
            originals[t.name] = (t, original)
        current = param.detach().cpu()
        if tuple(original.shape) != tuple(current.shape):
            raise UserError(f"GGUF tensor {t.name} has shape {original.shape}, the model's {tuple(current.shape)}.")
        if torch.equal(torch.from_numpy(original).to(current.dtype), current):
            tensors.append((t.name, t.data, t.tensor_type))
            copied += 1
            continue
        array = layout.to_file(t.name, current.float().numpy())
        tensors.append((t.name, array.astype(store if array.ndim > 1 else np.float32), None))
        written.append(t.name)
    for name, (key, param) in params.items():  # tensors the file lacks: only an untied unembedding is expected
        if name != "output.weight" or "token_embd.weight" not in originals:
            raise UserError(f"model tensor {key} ({name}) is not in {src}; cannot write it into a copy of that file.")
        if param.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            continue  # tied: llama.cpp and transformers tie output to token_embd when output.weight is absent
        t, original = originals["token_embd.weight"]
        current = param.detach().cpu()
        if torch.equal(torch.from_numpy(original).to(current.dtype), current):
            tensors.append((name, t.data, t.tensor_type))  # the untied unembedding is the original embedding
        else:
            tensors.append((name, layout.to_file(name, current.float().numpy()).astype(store), None))
        added.append(name)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(reader, writer)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {
        "file": Path(path).name,
        "source": {"gguf_file": str(src), "sha256": recorded or sha256_file(src)},
        "edited_tensors": written,
        "added_tensors": added,
        "copied_tensors": copied,
        "edited_dtype": dtype.upper(),
        "size_bytes": Path(path).stat().st_size,
        "source_size_bytes": src.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }
