"""``refusal-lens upstream``: SAE features upstream of refusal for a prompt (Lee, Breck, Arditi 2025)."""

from __future__ import annotations

import argparse

from ..core.config_args import number
from ..core.errors import UserError
from ..core.io import atomic_write_json, provenance, staging_dir
from ..direction.compute import Direction
from .common import (
    add_model_arguments,
    add_overwrite_argument,
    chat_template_from_args,
    check_out,
    load_model_from_args,
    result_options,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="the prompt to explain (repeat for several)")
    p.add_argument("--direction", default=None, help="direction.safetensors (default: the organism's shipped one)")
    p.add_argument("--sae", default=None, help="SAE at the source layer (default: the organism's upstream SAE)")
    p.add_argument("--no-sae", action="store_true", help="raw gradient and token saliency only")
    p.add_argument(
        "--target-layer", type=number(int, 0), default=None, help="layer L of R (default: the direction's layer)"
    )
    p.add_argument("--target-position", type=int, default=-1, help="prompt position of R (-1: last token)")
    p.add_argument("--source-layer", type=number(int, 0), default=None, help="source layer (default: the SAE's layer)")
    p.add_argument("--score", default="dot", choices=("dot", "cosine", "attribution"), help="latent score")
    p.add_argument("--aggregate", default="mean", choices=("mean", "sum"), help="aggregation over positions")
    p.add_argument("--positions", default="all", choices=("all", "instruction"), help="positions aggregated")
    p.add_argument("--top", type=number(int, 1), default=10, help="latents listed on each side")
    p.add_argument(
        "--steer-alpha",
        type=number(float),
        default=None,
        help="validate by steering: add alpha·W_dec[k] of the top positive and top negative latents at prompt "
        "positions and measure refusal with generations (positive should raise it, negative lower it)",
    )
    p.add_argument("--paraphrase", action="append", default=[], help="paraphrases for the sensitivity analysis")
    p.add_argument(
        "--word",
        action="append",
        default=[],
        help="a word of the prompt (repeat for several): swap it for a neutral word and patch the swapped run in "
        "at every earlier layer on the word's tokens, the other instruction tokens or the template, to see "
        "where its effect on R passes (activation patching)",
    )
    p.add_argument("--out", required=True, help="folder for upstream.json and the figures")
    add_overwrite_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..core.prompts import ChatFormatter
    from ..lens.mediation import GROUPS, word_mediation
    from ..lens.sensitivity import sensitivity
    from ..lens.upstream import first_order_check, upstream_features
    from ..lens.validation import steering_validation
    from ..organism import shipped_direction, shipped_saes
    from ..sae.formats import load_sae

    inputs = check_out(args)
    for prompt in args.prompt:
        if not prompt.strip():
            raise UserError(
                "--prompt is empty; give the instruction to explain, e.g. --prompt 'How do I pick a lock?'."
            )
    model, tokenizer = load_model_from_args(args)
    if args.model is not None and (args.direction is None or (args.sae is None and not args.no_sae)):
        raise UserError("--direction and --sae (or --no-sae) are required when --model is given.")
    direction = Direction.load(args.direction or shipped_direction(), model=model)
    sae = None if args.no_sae else load_sae(args.sae or shipped_saes()["upstream"], d_model=direction.vector.shape[0])
    target = direction.layer if args.target_layer is None else args.target_layer
    fmt = ChatFormatter(tokenizer, system=args.system, chat_template=chat_template_from_args(args))
    entries = []
    for prompt in args.prompt:
        res = upstream_features(
            model,
            fmt,
            prompt,
            direction.vector,
            target,
            sae,
            args.source_layer,
            args.score,
            args.aggregate,
            args.positions,
            args.top,
            args.target_position,
        )
        entry = res.to_json()
        if sae is not None and res.positive:
            top = res.positive[0]["latent"]
            entry["first_order_check"] = first_order_check(model, fmt, prompt, direction.vector, target, sae, top)
            entry["sensitivity"] = sensitivity(
                model, fmt, prompt, direction.vector, target, sae, args.paraphrase, top=args.top, score=args.score
            )
            if args.steer_alpha:
                entry["steering"] = steering_validation(model, tokenizer, fmt, sae, [prompt], res, args.steer_alpha)
        if args.word:
            # any change of R counts here (a word may also push against refusal); only no change is skipped
            entry["word_mediation"] = word_mediation(
                model, fmt, [(prompt, args.word)], direction.vector, target,
                target_position=args.target_position, min_effect=float("-inf"),
            )  # fmt: skip
        entries.append(entry)
    first = entries[0]
    payload = {
        "positive": first["positive"],
        "negative": first["negative"],
        "prompt": first["prompt"],
        "R": first["value"],
        "prompts": entries,
    }
    with staging_dir(args.out, args.overwrite, inputs) as stage:
        atomic_write_json(stage / "upstream.json", payload)
        atomic_write_json(
            stage / "provenance.json",
            provenance(
                command="upstream",
                sae=str(args.sae),
                direction=str(args.direction),
                system=args.system,
                chat_template_sha256=fmt.template_hash,
                options=result_options(args),
            ),
        )
        from ..report.lens import saliency_figure

        for i, e in enumerate(entries):
            (stage / f"saliency_{i}.png").write_bytes(saliency_figure(e["tokens"], e["saliency"]["grad_x_input"]))
    for e in entries:
        print(f"prompt: {e['prompt']!r}   R = {e['value']:.3f}")
        if e["positive"]:
            print(
                "  upstream of refusal:  " + ", ".join(f"{x['latent']} ({x['score']:+.3g})" for x in e["positive"][:5])
            )
            print(
                "  against refusal:      " + ", ".join(f"{x['latent']} ({x['score']:+.3g})" for x in e["negative"][:5])
            )
        med = e.get("word_mediation")
        if med and med["n_prompts"]:
            print(f"  swapping {', '.join(args.word)}: R {med['mean_R']:.3f} -> {med['mean_R_swapped']:.3f}; share of "
                  "the change passing through (word / other instruction / template tokens) at each layer:")  # fmt: skip
            for x in med["layers"]:
                print(f"    resid_pre[{x['layer']}]: " + " / ".join(f"{x['shares'][g]:.0%}" for g in GROUPS))
        elif med:
            print(f"  swapping {', '.join(args.word)}: no neutral word of equal token length, or R did not change")
    print(f"wrote {args.out}/upstream.json")
    return 0
