"""Options shared by several subcommands (model loading, prompt files, chat formatting)."""

from __future__ import annotations

import argparse

from ..core.data import Prompt
from ..core.errors import UserError
from ..core.models import choose_threads, load_model
from ..core.prompts import read_chat_template
from ..organism import load_prompts


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF model folder or hub id (default: the built-in model organism)")
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
        type=int,
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
