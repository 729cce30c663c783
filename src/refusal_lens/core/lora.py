"""LoRA in plain PyTorch: low-rank deltas on chosen linear layers, attached by hooks or merged into weights.

A LoRA adapter adds ``scale * B @ A`` to the weight ``W`` (out x in) of each chosen ``nn.Linear``, with ``A``
(rank x in) and ``B`` (out x rank), ``scale = alpha / rank`` (Hu et al. 2021). ``B`` starts at zero, so a fresh
adapter leaves the model unchanged.

* :func:`init_adapter` -- seeded ``A`` (Kaiming-uniform, as PEFT does) and zero ``B`` for every target layer.
* :func:`lora_attached` -- a context manager that adds ``x @ A.T @ B.T * scale`` to each target's output
  (forward hooks, removed on exit); gradients flow into ``A`` and ``B`` (used for training).
* :func:`merge_adapter` -- adds the deltas to the weights in place (the model used for everything else).
* :func:`save_adapter` / :func:`load_adapter` -- PEFT's adapter format: ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and ``adapter_config.json``, so
  ``peft.PeftModel.from_pretrained`` can read it too; no peft dependency here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """Low-rank factors per module name (``A``: rank x in, ``B``: out x rank) and the scale ``alpha / rank``."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in sorted(self.a) for t in (self.a[name], self.b[name])]

    def n_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def delta(self, name: str) -> torch.Tensor:
        """The weight delta ``scale * B @ A`` of one module (out x in)."""
        return self.scale * (self.b[name] @ self.a[name])


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules whose last name part is in ``target_modules`` (e.g. ``q_proj``)."""
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in set(target_modules)
    }
    if not found:
        raise UserError(f"the model has no linear layers named {', '.join(target_modules)}; check the LoRA targets.")
    return found


def init_adapter(
    model: nn.Module, target_modules: Sequence[str], rank: int = 8, alpha: float = 16.0, seed: int = 0
) -> LoraAdapter:
    """A fresh adapter (``B = 0``), with ``A`` drawn from a generator seeded by ``seed`` in module order."""
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1 (got {rank}).")
    gen = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(rank, float(alpha), tuple(target_modules))
    for name, lin in sorted(target_linears(model, target_modules).items()):
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) gives this bound
        a = (torch.rand(rank, lin.in_features, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        adapter.a[name] = a.requires_grad_(True)
        adapter.b[name] = torch.zeros(lin.out_features, rank, dtype=torch.float32, requires_grad=True)
    return adapter


@contextmanager
def lora_attached(model: nn.Module, adapter: LoraAdapter) -> Iterator[None]:
    """Add each module's low-rank delta to its output while the block runs; hooks are always removed."""
    modules = dict(model.named_modules())
    missing = [n for n in adapter.a if n not in modules]
    if missing:
        raise UserError(f"the LoRA adapter names modules the model lacks ({missing[0]}, ...); wrong base model?")
    handles = []

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            a, b = adapter.a[name].to(x.dtype), adapter.b[name].to(x.dtype)
            return output + (x @ a.T @ b.T) * adapter.scale

        return hook

    try:
        for name in adapter.a:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> None:
    """Add ``scale * B @ A`` to each target weight in place (computed in float32, then cast to the weight's dtype)."""
    modules = dict(model.named_modules())
    for name in adapter.a:
        if name not in modules:
            raise UserError(f"the LoRA adapter names a module the model lacks ({name}); wrong base model?")
        w = modules[name].weight
        w.copy_((w.float() + adapter.delta(name).detach().to(w.device)).to(w.dtype))


def save_adapter(adapter: LoraAdapter, folder: str | os.PathLike, base_model: str, extra: dict | None = None) -> Path:
    """Write PEFT's two files into ``folder`` (atomically each); ``extra`` goes into the config's
    ``refusal_lens`` entry (provenance)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(adapter.a):
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = adapter.a[name].detach().float()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = adapter.b[name].detach().float()
    atomic_save_safetensors(tensors, out / ADAPTER_FILE, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": list(adapter.target_modules),
        "refusal_lens": extra or {},
    }
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def load_adapter(folder: str | os.PathLike) -> tuple[LoraAdapter, dict[str, Any]]:
    """Read an adapter written by :func:`save_adapter` (or by PEFT, LoRA without bias); returns it and its config."""
    folder = Path(folder)
    config = read_json(folder / CONFIG_FILE, "LoRA adapter config")
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none":
        raise UserError(f"{folder} is not a plain LoRA adapter (peft_type LORA, bias none); re-create it.")
    tensors = load_safetensors(folder / ADAPTER_FILE, "LoRA adapter weights")
    adapter = LoraAdapter(int(config["r"]), float(config["lora_alpha"]), tuple(config.get("target_modules", ())))
    for key, t in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            adapter.a[name[: -len(".lora_A.weight")]] = t.float()
        elif name.endswith(".lora_B.weight"):
            adapter.b[name[: -len(".lora_B.weight")]] = t.float()
    if not adapter.a or set(adapter.a) != set(adapter.b):
        raise UserError(f"{folder / ADAPTER_FILE} does not hold matching lora_A/lora_B pairs; re-create it.")
    return adapter, config


def load_adapted(name: str, loader: Any, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """A named model built from its base (``smollm2-safe`` = ``smollm2`` + the shipped adapter), merged in memory.

    ``loader`` is :func:`refusal_lens.core.models.load_model`. Merging happens in float32 before any cast, so a
    float16/bfloat16 load rounds the merged weights once. Provenance records the adapter's sha256.
    """
    import hashlib

    from .real_models import REAL_MODELS, adapter_dir

    spec = REAL_MODELS[name.lower()]
    folder = adapter_dir(spec.name)
    adapter, config = load_adapter(folder)
    dtype = load_kwargs.pop("dtype", "float32")
    model, tokenizer = loader(spec.base, dtype="float32", **load_kwargs)
    merge_adapter(model, adapter)
    from .models import parse_dtype

    target = parse_dtype(dtype)
    if target != torch.float32:
        model.to(target)
    base_info = getattr(model, "refusal_lens_gguf", None)
    model.config._name_or_path = spec.name
    model.refusal_lens_adapter = {
        "name": spec.name,
        "base": spec.base,
        "base_gguf": base_info,
        "adapter": str(folder),
        "adapter_sha256": hashlib.sha256((folder / ADAPTER_FILE).read_bytes()).hexdigest(),
        "rank": adapter.rank,
        "target_modules": list(adapter.target_modules),
    }
    return model, tokenizer
