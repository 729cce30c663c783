"""``refusal-lens direction``: extract and select the refusal direction, save it with all candidate scores."""

from __future__ import annotations

import argparse

from ..core.config_args import add_dataclass_arguments, dataclass_from_args
from ..core.errors import UserError
from ..core.io import atomic_save_safetensors, atomic_write_json, staging_dir
from ..direction.compute import DirectionConfig, compute_direction
from ..direction.scoring import parse_refusal_tokens
from ..direction.selection import SelectionConfig
from .common import (
    add_model_arguments,
    add_overwrite_argument,
    add_prompt_arguments,
    chat_template_from_args,
    check_out,
    instructions,
    load_model_from_args,
    resolve_prompts,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_prompt_arguments(p)
    p.add_argument("--out", required=True, help="output folder (direction.safetensors, direction.json)")
    add_overwrite_argument(p)
    p.add_argument(
        "--refusal-tokens",
        default=None,
        help="comma-separated refusal tokens or ids (default: detected from the model's refusals)",
    )
    g = p.add_argument_group("extraction")
    add_dataclass_arguments(g, DirectionConfig)
    g = p.add_argument_group("selection filters")
    add_dataclass_arguments(g, SelectionConfig, skip=("batch_size",))


def run(args: argparse.Namespace) -> int:
    inputs = check_out(args)
    harmful = resolve_prompts(args, "harmful", "train")
    harmless = resolve_prompts(args, "harmless", "train")
    harmful_val = resolve_prompts(args, "harmful-val", "val")
    harmless_val = resolve_prompts(args, "harmless-val", "val")
    template = chat_template_from_args(args)
    model, tokenizer = load_model_from_args(args)
    ids = parse_refusal_tokens(tokenizer, args.refusal_tokens) if args.refusal_tokens else None
    config = dataclass_from_args(
        DirectionConfig,
        args,
        selection=dataclass_from_args(SelectionConfig, args, batch_size=args.batch_size),
    )
    # What each set really is: the file given, the organism's split, or (validation only) None, in which case
    # compute_direction carves it out of the training prompts and records how.
    data = {}
    for name, split in (("harmful", "train"), ("harmless", "train"), ("harmful-val", "val"), ("harmless-val", "val")):
        given = getattr(args, name.replace("-", "_"))
        organism = f"organism:{name.removesuffix('-val')}:{split}" if args.model is None else None
        data[name.replace("-", "_")] = given or organism
    result = compute_direction(
        model,
        tokenizer,
        instructions(harmful),
        instructions(harmless),
        instructions(harmful_val),
        instructions(harmless_val),
        config=config,
        refusal_tokens=ids,
        system=args.system,
        chat_template=template,
        data_info=data,
    )
    direction, selection = result.chosen, result.selection
    with staging_dir(args.out, args.overwrite, inputs) as stage:
        if selection is not None:
            atomic_write_json(stage / "selection.json", selection.to_json())
        if direction is None:
            atomic_save_safetensors({"candidates": result.candidates}, stage / "candidates.safetensors")
            atomic_write_json(stage / "direction_failed.json", result.info)
        else:
            direction.save(stage)
    if direction is None:
        raise UserError(f"{selection.explanation}\n(candidate scores saved in {args.out}/selection.json)")
    for key in ("harmful_val", "harmless_val"):
        carved = result.info["data"].get(key)
        if isinstance(carved, dict):
            print(
                f"{key.replace('_', ' ')}: {carved['n_prompts']} prompts carved out of {carved['carved_from']} "
                f"({carved['of']} prompts, seed {carved['seed']}; disjoint from the training sample)"
            )
    print(selection.explanation if selection else f"using layer {direction.layer}, position {direction.position}")
    print(f"saved {args.out}/direction.safetensors and direction.json")
    return 0
