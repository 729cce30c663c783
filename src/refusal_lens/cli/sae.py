"""``refusal-lens sae train|eval|decompose|export``: SAEs on chat or plain text, direction decomposition, formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.config_args import HelpFormatter, number
from ..core.errors import UserError
from ..core.io import atomic_write_json, provenance, staging_dir
from ..direction.compute import Direction
from ..organism import load_prompts
from .common import (
    add_model_arguments,
    add_overwrite_argument,
    chat_template_from_args,
    check_out,
    load_model_from_args,
    result_options,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .sae_train_eval import add_eval_arguments, add_train_arguments, run_eval, run_train

    sub = p.add_subparsers(dest="sae_command", metavar="ACTION", required=True)
    fmt = HelpFormatter
    t = sub.add_parser("train", help="train SAE(s) on a model's activations (chat, text or a mix)", formatter_class=fmt)
    add_train_arguments(t)
    t.set_defaults(_run=run_train)
    e = sub.add_parser(
        "eval", help="L0, FVU, dead/dense latents, CE loss recovered with the SAE spliced in", formatter_class=fmt
    )
    add_eval_arguments(e)
    e.set_defaults(_run=run_eval)
    d = sub.add_parser(
        "decompose", help="how faithfully and sparsely SAEs reconstruct the refusal direction", formatter_class=fmt
    )
    add_model_arguments(d)
    d.add_argument("--direction", default=None, help="direction.safetensors (default: the organism's shipped one)")
    d.add_argument(
        "--sae",
        action="append",
        default=None,
        help="SAE folder (SAELens/sparsify/dictionary_learning/Gemma Scope); repeat to compare "
        "(default: the organism's chat-data and text-data SAEs)",
    )
    d.add_argument("--harmful", default=None, help="harmful prompts (default with the organism: 64 of its val+test)")
    d.add_argument("--harmless", default=None, help="harmless prompts (default with the organism: 64 of its test)")
    d.add_argument("--column", default=None, help="column holding the instruction")
    d.add_argument("-n", "--n-prompts", type=number(int, 1), default=64, help="prompts of each kind (paper: 64)")
    d.add_argument("--max-k", type=number(int, 1), default=512, help="largest number of latents in the sparsity curve")
    d.add_argument("--out", default="sae-decompose", help="folder for decomposition.json and the figure")
    add_overwrite_argument(d)
    d.set_defaults(_run=run_decompose)
    x = sub.add_parser(
        "export",
        help="write an SAE in another tool's format (sparsify: loads with SparseCoder.load_from_disk)",
        formatter_class=fmt,
    )
    x.add_argument("--sae", required=True, help="SAE folder or file to convert (any format refusal-lens reads)")
    x.add_argument(
        "--format",
        choices=("sparsify", "saelens"),
        default="sparsify",
        help="sparsify writes OUT/<hookpoint>/{cfg.json,sae.safetensors} (TopK SAEs on the residual stream); "
        "saelens writes OUT/{cfg.json,sae_weights.safetensors}",
    )
    x.add_argument("--out", required=True, help="output folder")
    x.set_defaults(_run=run_export)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - each action sets its own _run
    raise UserError("choose an action: train, eval, decompose or export")


def _default_saes() -> list[Path]:
    from ..organism import shipped_saes

    return list(shipped_saes().values())


def run_decompose(args: argparse.Namespace) -> int:
    from ..core.prompts import ChatFormatter
    from ..lens.decompose import decompose_direction, latents_for_error
    from ..sae.formats import load_sae

    inputs = check_out(args)
    model, tokenizer = load_model_from_args(args)
    if args.model is not None and (args.direction is None or args.harmful is None or args.harmless is None):
        raise UserError(
            "--direction, --harmful and --harmless are required when --model is given (the defaults are the "
            "organism's, which say nothing about another model)."
        )
    from ..organism import shipped_direction

    direction = Direction.load(args.direction or shipped_direction(), model=model)
    harmful = load_prompts(args.harmful or "organism:harmful:test", args.column, n=args.n_prompts)
    harmless = load_prompts(args.harmless or "organism:harmless:test", args.column, n=args.n_prompts)
    fmt = ChatFormatter(tokenizer, system=args.system, chat_template=chat_template_from_args(args))
    paths = [Path(s) for s in (args.sae or _default_saes())]
    results = []
    for path in paths:
        sae = load_sae(path, d_model=direction.vector.shape[0])
        dec = decompose_direction(
            model,
            fmt,
            sae,
            [p.instruction for p in harmful],
            [p.instruction for p in harmless],
            position=direction.position,
            direction=direction.vector,
            name=path.name,
            max_k=args.max_k,
        )
        results.append(dec.to_json() | {"path": str(path)})
    with staging_dir(args.out, args.overwrite, inputs) as stage:
        atomic_write_json(
            stage / "decomposition.json",
            {"saes": results, "direction": {"layer": direction.layer, "position": direction.position}},
        )
        atomic_write_json(
            stage / "provenance.json",
            provenance(
                command="sae decompose",
                saes=[str(p) for p in paths],
                system=args.system,
                chat_template_sha256=fmt.template_hash,
                options=result_options(args),
            ),
        )
        from ..report.lens import decomposition_figure

        (stage / "decomposition.png").write_bytes(decomposition_figure(results))
    print(f"{'SAE':<24}{'cosine':>8}{'rel.err':>9}{'max 1-latent cos':>18}{'k for err<=0.5':>16}")
    for r in results:
        k = latents_for_error(r["sparsity_curve"], 0.5)
        print(
            f"{r['name']:<24}{r['cosine']:>8.3f}{r['relative_error']:>9.3f}{r['max_single_latent_cosine']:>18.3f}"
            f"{k if k is not None else '-':>16}"
        )
    print(f"wrote {args.out}/decomposition.json and decomposition.png")
    return 0


def sparsify_hookpoint(layer: int, site: str) -> str:
    """sparsify names residual-stream hookpoints ``layers.N``: the output of decoder layer N (SPEC §5)."""
    if site == "resid_post":
        return f"layers.{layer}"
    if site == "resid_pre" and layer >= 1:
        return f"layers.{layer - 1}"  # the input of block l is the output of block l-1
    raise UserError(
        f"sparsify hookpoints are outputs of decoder layers; an SAE on {site} of layer {layer} has none. "
        "Export it with --format saelens instead."
    )


def run_export(args: argparse.Namespace) -> int:
    from ..lens.latents import sae_site
    from ..sae.formats import load_sae, save_saelens, save_sparsify

    sae = load_sae(args.sae)
    with staging_dir(args.out) as stage:
        if args.format == "sparsify":
            layer, site = sae_site(sae)
            written = save_sparsify(sae, stage / sparsify_hookpoint(layer, site))
            where = Path(args.out) / written.name
            hint = f"load with sparsify: SparseCoder.load_from_disk('{where}') or SparseCoder.load_many('{args.out}')"
        else:
            save_saelens(sae, stage)
            hint = f"load it with SAELens: SAE.load_from_disk('{args.out}')"
    print(f"wrote {args.format} SAE to {args.out}; {hint}")
    return 0
