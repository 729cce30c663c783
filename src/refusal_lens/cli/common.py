"""Options shared by several subcommands (model loading, prompt files, chat formatting)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.config_args import number
from ..core.data import Prompt
from ..core.errors import UserError
from ..core.io import check_out_dir, read_text_file
from ..core.models import choose_threads, is_organism_model, load_model, resolve_model_path
from ..core.prompts import read_chat_template
from ..organism import load_prompts


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="HF model folder, hub id, .gguf file (or a folder holding one), or a real model installed from PyPI: "
        "smollm2, gemma3-270m (default: the built-in model organism)",
    )
    g.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cpu)")
    g.add_argument(
        "--device-map",
        default=None,
        help="split the model over devices with accelerate: auto, balanced, sequential, or a JSON object "
        "mapping module names to devices (overrides --device; needs pip install accelerate)",
    )
    g.add_argument(
        "--threads",
        type=number(int, 1),
        default=None,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 for models under 1B parameters)",
    )
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    g.add_argument("--system", default=None, help="system prompt placed before each instruction")
    g.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template file for tokenizers without one, or a shipped one: gemma",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=number(int, 1),
        default=None,
        help="cut formatted prompts to this many tokens, with a warning (default: the model's context length)",
    )


def load_model_from_args(args: argparse.Namespace) -> tuple[object, object]:
    threads = getattr(args, "threads", None)
    choose_threads(threads)  # loading runs on CPU threads too
    model, tokenizer = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    limit = getattr(args, "max_prompt_tokens", None)
    if limit is not None:  # ChatFormatter cuts prompts to the tokenizer's model_max_length (core.prompts)
        tokenizer.model_max_length = min(limit, tokenizer.model_max_length)
    choose_threads(threads, model)
    return model, tokenizer


def chat_template_from_args(args: argparse.Namespace) -> str | None:
    return read_chat_template(args.chat_template) if args.chat_template else None


def add_prompt_arguments(p: argparse.ArgumentParser, val: bool = True) -> None:
    g = p.add_argument_group("prompts (JSON/JSONL/CSV/Parquet/TXT file, datasets id, or organism:KIND:SPLIT)")
    g.add_argument("--harmful", default=None, help="harmful instructions (default with the organism: its split)")
    g.add_argument("--harmless", default=None, help="harmless instructions (default with the organism: its split)")
    if val:
        g.add_argument("--harmful-val", default=None, help="harmful validation set (default: split from --harmful)")
        g.add_argument("--harmless-val", default=None, help="harmless validation set (default: split from --harmless)")
    g.add_argument("--column", default=None, help="column holding the instruction (default: recognised)")


def resolve_prompts(args: argparse.Namespace, name: str, organism_split: str) -> list[Prompt] | None:
    """Load ``--<name>``; with no value, the organism's split when the model is the organism."""
    value = getattr(args, name.replace("-", "_"), None)
    if value is None:
        if args.model is not None:
            if name.endswith("-val"):
                return None
            raise UserError(f"--{name} is required when --model is given (a prompt file or datasets id).")
        kind = name.removesuffix("-val")
        value = f"organism:{kind}:{organism_split}"
    return load_prompts(value, column=args.column)


# Options that name files or folders the command reads: --out may never be one of them, inside or around them.
INPUT_OPTIONS = (
    "model", "direction", "sae", "harmful", "harmless", "harmful_val", "harmless_val", "borderline", "plain_text",
    "instruction_data", "chat_template", "judge_model", "data_file", "checkpoint", "dir",
)  # fmt: skip


# Options that change no result (where and how output is written, what is printed).
NOT_RESULT_OPTIONS = {"out", "overwrite", "resume", "quiet", "no_report", "command", "_run"}


def result_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the command that can change its results (for provenance), sorted by name."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RESULT_OPTIONS and not callable(v)}


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --out (the files in it are deleted)"
    )


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every local file or folder the command reads (the organism's folder when no --model is given)."""
    paths: list[str] = []
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not str(item).startswith("organism:") and Path(str(item)).expanduser().exists():
                paths.append(str(item))
    if getattr(args, "model", "") is None:
        paths.append(resolve_model_path(None))
    return paths


def check_out(args: argparse.Namespace) -> list[str]:
    """Refuse a --out that would lose data, before any work; returns the inputs for ``staging_dir``."""
    inputs = input_paths(args)
    check_out_dir(args.out, getattr(args, "overwrite", False), inputs)
    return inputs


def add_gguf_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf",
        choices=("f32", "f16", "none"),
        default=None,
        help="GGUF input (a .gguf file, smollm2, smollm2-safe...): also write the edited model as OUT/model.gguf "
        "from the input file, edited tensors in f32 (default; exact) or f16 (half their size); none: do not",
    )


def gguf_export_dtype(args: argparse.Namespace) -> str | None:
    """The dtype of OUT/model.gguf's edited tensors, or None for no GGUF (checked before any work)."""
    choice = getattr(args, "gguf", None)
    is_gguf = resolve_model_path(args.model).lower().endswith(".gguf")  # real names resolve to their GGUF file
    if choice in ("f32", "f16") and not is_gguf:
        raise UserError(f"--gguf {choice} needs a GGUF input (--model file.gguf or smollm2...); {args.model} is not.")
    if choice == "none" or not is_gguf:
        return None
    return choice or "f32"


def instructions(prompts: list[Prompt] | None) -> list[str] | None:
    """The instruction texts of a prompt set (None stays None: a validation set left to be carved)."""
    return None if prompts is None else [p.instruction for p in prompts]


def read_records(path: str, what: str) -> list[Any]:
    """Records of a JSON list, JSON Lines or plain-text (blank-line separated documents) file."""
    p = Path(path).expanduser()
    text = read_text_file(p, f"{what} file")
    try:
        if p.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if p.suffix.lower() == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} file {p} is not valid JSON ({exc}); fix it.") from None
    return [line for line in text.split("\n\n") if line.strip()]  # plain text: blank-line separated documents


def add_plain_text_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-text", default=None, help="TXT/JSON/JSONL texts for the plain-text CE loss (optional)")


def plain_texts_from_args(args: argparse.Namespace) -> list[str] | None:
    """``--plain-text``'s texts; without it the organism's corpus for the organism (it says nothing about
    another model's loss), else None."""
    if args.plain_text is None:
        if is_organism_model(args.model):
            from ..organism import plain_text

            return plain_text()
        return None
    recs = read_records(args.plain_text, "--plain-text")
    texts = [r if isinstance(r, str) else r.get("text") for r in recs]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"--plain-text {args.plain_text} holds no texts; give strings or objects with 'text'.")
    return texts
