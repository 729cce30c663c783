"""``refusal-lens abliterate``: search the (refusal, KL) front of per-layer ablations, write the chosen model.

Example:
    refusal-lens abliterate --harmful h.json --harmless ok.json --model M --max-kl 0.01 --out abliterated/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..abliteration.outputs import EXPORTS, write_outputs
from ..abliteration.pipeline import AbliterateConfig, abliterate
from ..core.config_args import add_dataclass_arguments, dataclass_from_args, number
from ..core.errors import UserError
from ..direction.scoring import parse_refusal_tokens
from ..direction.strengths import edited_weights
from ..evaluation.capability import CapabilityConfig, before_after, check_tasks, side_by_side
from .common import (
    add_gguf_argument,
    add_model_arguments,
    add_overwrite_argument,
    add_plain_text_argument,
    add_prompt_arguments,
    chat_template_from_args,
    check_out,
    gguf_export_dtype,
    instructions,
    load_model_from_args,
    plain_texts_from_args,
    resolve_prompts,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_prompt_arguments(p)
    p.add_argument("--out", required=True, help="output folder: the chosen point's merged checkpoint, front.json, ...")
    add_overwrite_argument(p)
    pick = p.add_mutually_exclusive_group()
    pick.add_argument(
        "--max-kl", type=number(float, 0), default=None, help="pick the fewest refusals with KL <= this (default 0.02)"
    )
    pick.add_argument(
        "--max-refusal",
        type=number(float, 0, 1),
        default=None,
        help="pick the lowest KL with refusal rate <= this (0..1)",
    )
    p.add_argument("--export", default="", help=f"comma-separated extra exports: {', '.join(EXPORTS)}")
    add_gguf_argument(p)
    p.add_argument(
        "--checkpoint", default=None, help="resume file (default: .<out name>.abliterate.jsonl beside --out)"
    )
    p.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens or ids (default: detected)")
    p.add_argument("--force", action="store_true", help="edit post-norm families too, where the edit is inexact")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_dataclass_arguments(p.add_argument_group("search"), AbliterateConfig)
    cap = p.add_argument_group("capability (original vs the chosen point; CE loss whenever there is plain text)")
    add_plain_text_argument(cap)
    add_dataclass_arguments(cap, CapabilityConfig)


def run(args: argparse.Namespace) -> int:
    exports = [e.strip() for e in args.export.split(",") if e.strip()]
    unknown = [e for e in exports if e not in EXPORTS]
    if unknown:
        raise UserError(f"--export {','.join(unknown)} is unknown; choose from {', '.join(EXPORTS)}.")
    inputs = check_out(args)  # before any work: an --out that would lose data is refused
    gguf_dtype = gguf_export_dtype(args)
    cfg = dataclass_from_args(AbliterateConfig, args)
    cap_cfg = dataclass_from_args(CapabilityConfig, args)
    check_tasks(cap_cfg)
    texts = plain_texts_from_args(args)
    if cfg.n_search < 2 or cfg.n_train < 2 or (cfg.n_kl is not None and cfg.n_kl < 2) or cfg.max_evaluations < 1:
        raise UserError("--n-search, --n-kl and --n-train must be at least 2 and --max-evaluations at least 1.")
    harmful = resolve_prompts(args, "harmful", "train")
    harmless = resolve_prompts(args, "harmless", "train")
    harmful_val = resolve_prompts(args, "harmful-val", "val")
    harmless_val = resolve_prompts(args, "harmless-val", "val")
    out = Path(args.out)
    checkpoint = args.checkpoint or str(out.resolve().parent / f".{out.resolve().name}.abliterate.jsonl")
    model, tokenizer = load_model_from_args(args)
    ids = parse_refusal_tokens(tokenizer, args.refusal_tokens) if args.refusal_tokens else None
    result = abliterate(
        model,
        tokenizer,
        instructions(harmful),
        instructions(harmless),
        checkpoint,
        cfg,
        instructions(harmful_val),
        instructions(harmless_val),
        system=args.system,
        chat_template=chat_template_from_args(args),
        refusal_ids=ids,
        max_kl=args.max_kl,
        max_refusal=args.max_refusal,
        progress=not (args.no_progress or args.quiet),
        force=args.force,
    )
    capability = None
    if cap_cfg.requested() or (texts and cap_cfg.n_ce):
        plan = result.point.plan(result.directions)
        edit = lambda: edited_weights(model, plan, cfg.norm_preserving, args.force)  # noqa: E731
        capability = before_after(model, tokenizer, cap_cfg, texts, edit)
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    summary = write_outputs(
        out, model, tokenizer, result, checkpoint, exports, ["refusal-lens", *sys.argv[1:]], options,
        cfg.norm_preserving, args.force, overwrite=args.overwrite, inputs=inputs, gguf_dtype=gguf_dtype,
        extra={"capability": capability},
    )  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "front"} | {"front": summary["front"]}, indent=2))
        return 0
    c, base = summary["chosen"], summary["baseline"]
    n = base["n_harmful_search"]
    print(
        f"scored {summary['evaluations']} points ({summary['evaluations_resumed']} resumed) in "
        f"{summary['seconds_search']:.0f} s; checked {len(summary['front'])} front points by generation.\n"
        f"chosen: {c['refusals_generated']}/{n} harmful refused (original {base['refusals_generated']}/{n}), "
        f"first-token KL {c['kl']:.4g} on harmless prompts.\n"
        f"wrote {out}/ (merged checkpoint, front.json, front.png, README.md, reproduce.json"
        + "".join(f", {e}" for e in exports)
        + (", model.gguf" if gguf_dtype else "")
        + ")"
    )
    if capability:
        print("\n".join(side_by_side(capability)))
    return 0
