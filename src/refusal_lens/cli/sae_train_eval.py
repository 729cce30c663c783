"""``refusal-lens sae train`` and ``refusal-lens sae eval``: arguments built from the dataclass configs.

Every field of :class:`SAEConfig`, :class:`TrainConfig`, :class:`DataConfig` and :class:`EvalConfig`
becomes an option whose help text is the field's ``metadata["help"]``, so the library and the CLI cannot
drift apart. ``--arch topk,batchtopk`` trains several SAEs on one activation stream (each written to
``OUT/<arch>``). Distributed: ``torchrun --no-python --nproc_per_node 2 refusal-lens sae train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..core.config_args import add_dataclass_arguments, dataclass_from_args, number
from ..core.errors import UserError
from ..core.io import check_out_dir, check_out_file
from ..lens.latents import sae_site
from ..sae.base import ARCHITECTURES, SAEConfig
from ..sae.evaluate import EvalConfig
from ..sae.source import DataConfig
from ..sae.trainer import TrainConfig

# Fields that are not options (filled in from elsewhere) and options renamed to avoid clashes between configs.
_SKIP = {SAEConfig: {"d_in", "dtype", "arch"}}
_RENAME = {DataConfig: {"seed": "data_seed"}, EvalConfig: {"tokens": "eval_tokens", "batch_size": "eval_batch_size"}}


def _add_fields(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    add_dataclass_arguments(parser, cls, skip=_SKIP.get(cls, set()), title=title, rename=_RENAME.get(cls))


def _build(cls: type, args: argparse.Namespace, **override: Any) -> Any:
    return dataclass_from_args(cls, args, rename=_RENAME.get(cls), **override)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="HF model folder, hub id, .gguf file, or smollm2 / gemma3-270m (default: the built-in organism)",
    )
    g.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 for models under 1B parameters)",
    )
    g.add_argument(
        "--device",
        default=None,
        help="model device, e.g. cuda:0 (default: cpu); under torchrun, 'cuda' means cuda:LOCAL_RANK",
    )
    g.add_argument(
        "--device-map",
        default=None,
        help="split the model over devices with accelerate (auto, or a JSON object); needs pip install accelerate",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``refusal-lens sae train``."""
    parser.add_argument("--layer", type=number(int, 0), required=True, help="decoder layer whose site is read")
    parser.add_argument(
        "--site",
        default="resid_pre",
        choices=("resid_pre", "resid_post", "attn_out", "mlp_out"),
        help="which activation of the layer (resid_pre = input of the block)",
    )
    parser.add_argument(
        "--arch", default="topk", help=f"architecture, or several separated by commas ({', '.join(ARCHITECTURES)})"
    )
    parser.add_argument("--out", required=True, help="output folder (SAELens v6 format; checkpoints inside)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.pt")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out (files of the same name are replaced)"
    )
    parser.add_argument(
        "--cache", default=None, help="activation cache folder: written on first use, then replayed (one model pass)"
    )
    parser.add_argument(
        "--cache-tokens",
        type=number(int, 1),
        default=None,
        help="activations written to a new --cache (default: --tokens); training cycles through them, so a "
        "model pass far slower than an SAE step (a real model on CPU) is paid once for several epochs",
    )
    _add_model_arguments(parser)
    _add_fields(parser, SAEConfig, "SAE")
    _add_fields(parser, TrainConfig, "training")
    _add_fields(parser, DataConfig, "data")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``refusal-lens sae eval``."""
    parser.add_argument(
        "--sae", required=True, help="SAE folder or file (SAELens, sparsify, dictionary_learning, Gemma Scope)"
    )
    parser.add_argument("--layer", type=number(int, 0), default=None, help="layer (default: from the SAE's metadata)")
    parser.add_argument("--site", default=None, help="site (default: from the SAE's metadata)")
    parser.add_argument("--out", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_model_arguments(parser)
    _add_fields(parser, EvalConfig, "evaluation")
    _add_fields(parser, DataConfig, "data")


def rank_device(device: str | None, env: dict[str, str] | None = None) -> str | None:
    """``cuda`` without an index means this process's own GPU (``cuda:LOCAL_RANK``) when launched by torchrun."""
    env = os.environ if env is None else env
    if device == "cuda" and int(env.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..core.models import choose_threads, is_organism_model, load_model

    if getattr(args, "data_file", None) is None and not is_organism_model(args.model):
        raise UserError(
            "--data-file is required when --model is given: the default corpus is the organism's synthetic data, "
            "which says nothing about another model. Pass a JSON/JSONL of {'text'}, {'messages'} or "
            "{'instruction','reply'} records."
        )
    device_map = getattr(args, "device_map", None)
    choose_threads(getattr(args, "threads", None))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=rank_device(args.device), device_map=device_map)
    choose_threads(getattr(args, "threads", None), model)
    return model, tokenizer


def run_train(args: argparse.Namespace) -> int:
    """Train the SAE(s) described by ``args`` (data parallel under torchrun); returns the exit status."""
    from ..sae.trainer import init_distributed, shutdown_distributed

    rank, world = init_distributed()
    try:
        rc = _train(args, rank, world)
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()
    if world > 1:
        # Gloo's worker threads can abort the interpreter's teardown ("terminate called without an active
        # exception", pytorch#28126) after a clean run; everything is written, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _train(args: argparse.Namespace, rank: int, world: int) -> int:
    from ..core.io import provenance
    from ..core.models import model_name, model_provenance
    from ..sae.source import ActivationSource
    from ..sae.streams import CachedStream, write_activation_cache
    from ..sae.trainer import train_saes
    from .common import input_paths

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHITECTURES:
            raise UserError(f"--arch {a!r} is unknown; choose from {', '.join(ARCHITECTURES)}.")
    if args.cache_tokens is not None and not args.cache:
        raise UserError("--cache-tokens sets the size of an activation cache; give the cache folder with --cache.")
    # Training writes checkpoints into --out as it goes (for --resume), so it is checked, not staged.
    check_out_dir(args.out, args.overwrite or args.resume, input_paths(args))
    model, tokenizer = _load_model(args)
    train_cfg = _build(TrainConfig, args)
    data_cfg = _build(DataConfig, args, buffer_tokens=min(args.buffer_tokens, train_cfg.tokens))
    source = ActivationSource(model, tokenizer, args.layer, args.site, data_cfg, train_cfg.batch_size)
    stream: Any = source
    if args.cache:
        cache = Path(args.cache)
        if not (cache / "index.json").exists():
            if rank == 0:
                n_cache = args.cache_tokens or train_cfg.tokens
                write_activation_cache(source, cache, n_cache, metadata=source.describe())
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
        stream = CachedStream(cache, train_cfg.batch_size)
        want = source.describe()
        for key in ("hf_module_path", "site", "data_mix", "dataset_path"):
            if stream.metadata.get(key, want[key]) != want[key]:
                raise UserError(
                    f"activation cache {cache} holds {key}={stream.metadata[key]!r}, not {want[key]!r}; "
                    "use another --cache folder or delete this one."
                )
    cfgs = {a: _build(SAEConfig, args, arch=a, d_in=source.d_in) for a in archs}
    meta = source.describe() | {"model_name": model_name(model), "provenance": provenance(**model_provenance(model))}
    saes = train_saes(cfgs, stream, train_cfg, Path(args.out), meta, resume=args.resume)
    if rank == 0:
        for name in saes:
            print(f"wrote {Path(args.out) / name if len(saes) > 1 else Path(args.out)}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate an SAE on a model and data; prints (and optionally writes) the metrics."""
    from ..core.adapters import get_adapter
    from ..core.io import atomic_write_json, provenance
    from ..sae.evaluate import evaluate_sae
    from ..sae.formats import load_sae
    from ..sae.source import ActivationSource
    from .common import input_paths

    if args.out:
        check_out_file(args.out, args.overwrite, input_paths(args))
    model, tokenizer = _load_model(args)
    adapter = get_adapter(model)
    sae = load_sae(args.sae, d_model=adapter.d_model)
    layer, site = sae_site(sae, args.layer, args.site)
    eval_cfg = _build(EvalConfig, args)
    # No point shuffling more activations together than the evaluation reads.
    data_cfg = _build(DataConfig, args, buffer_tokens=min(args.buffer_tokens, eval_cfg.tokens))
    source = ActivationSource(model, tokenizer, layer, site, data_cfg, eval_cfg.batch_size)
    metrics = evaluate_sae(sae, source, eval_cfg)
    metrics |= {"sae": str(args.sae), "layer": layer, "site": site, "data": args.data}
    for key, value in metrics.items():
        if key != "warnings":
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    for warning in metrics.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        atomic_write_json(args.out, metrics | {"provenance": provenance()})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m refusal_lens.cli.sae_train_eval train|eval ...``) until the CLI is wired."""
    parser = argparse.ArgumentParser(prog="refusal-lens sae")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_train_arguments(sub.add_parser("train", help="train SAE(s) on model activations"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate an SAE"))
    args = parser.parse_args(argv)
    try:
        return run_train(args) if args.cmd == "train" else run_eval(args)
    except UserError as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
