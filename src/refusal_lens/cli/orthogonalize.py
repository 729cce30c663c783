"""``refusal-lens orthogonalize``: remove a direction from a model's weights, save a normal HF checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.models import model_provenance, resolve_model_path
from ..direction.compute import Direction
from ..direction.orthogonalize import orthogonalize_checkpoint, orthogonalize_model, save_orthogonalized
from .common import (
    add_gguf_argument,
    add_model_arguments,
    add_overwrite_argument,
    check_out,
    gguf_export_dtype,
    load_model_from_args,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--direction", required=True, help="direction.safetensors (or its folder)")
    p.add_argument("--out", required=True, help="folder for the edited checkpoint")
    add_overwrite_argument(p)
    add_gguf_argument(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="edit families with post-sublayer norms too (Gemma-2/3, OLMo-2), where the edit is inexact",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model and edit it in memory instead of streaming over the shards",
    )


def run(args: argparse.Namespace) -> int:
    inputs = check_out(args)
    gguf_dtype = gguf_export_dtype(args)
    src = Path(resolve_model_path(args.model))
    direction = Direction.load(args.direction)
    extra = {"direction": str(args.direction), "layer": direction.layer, "position": direction.position}
    if not args.in_memory and src.is_dir():
        summary = orthogonalize_checkpoint(
            src,
            direction.vector,
            args.out,
            force=args.force,
            trust_remote_code=args.trust_remote_code,
            extra_provenance=extra,
            overwrite=args.overwrite,
            inputs=inputs,
        )
        print(f"streamed {len(summary['shards'])} shard(s), edited {len(summary['edited'])} tensors -> {args.out}")
        return 0
    model, tokenizer = load_model_from_args(args)
    extra |= model_provenance(model)  # a GGUF input: its file, sha256 and quantization type
    direction.check(model, str(args.direction))
    edited = orthogonalize_model(model, direction.vector, force=args.force)
    save_orthogonalized(model, tokenizer, args.out, extra, args.overwrite, inputs, gguf_dtype)
    also = f" (and {args.out}/model.gguf)" if gguf_dtype else ""
    print(f"edited {len(edited)} tensors in memory -> {args.out}{also}")
    return 0
