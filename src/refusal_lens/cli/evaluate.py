"""``refusal-lens evaluate``: refusal, false refusal, KL and CE loss under each intervention, plus the report.

Writes ``results.json`` (schema: docs/results-schema.md), ``completions.jsonl``, ``provenance.json`` and
``report.html`` (with ``figures/*.png``) into ``--out``. Every input is checked before any generation starts,
and the folder is written atomically, so a bad input leaves no partial output.

Example::

    refusal-lens evaluate --direction out/direction --out out/eval          # the organism, its test splits
    refusal-lens evaluate --model M --direction D --harmful jbb.json --harmless alpaca.json --out E
    refusal-lens evaluate --model DIR --direction D ... --backend vllm --intervention ablate --out E   # vLLM replies
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.config_args import add_dataclass_arguments, dataclass_from_args, number
from ..core.errors import UserError
from ..core.io import staging_dir, stale_stage
from ..core.models import is_organism_model, resolve_model_path
from ..core.real_models import is_real_model_name
from ..direction.compute import Direction
from ..direction.scoring import parse_refusal_tokens
from ..evaluation.conditions import EvalSettings, evaluate_conditions, standard_conditions, write_evaluation
from ..evaluation.journal import CompletionJournal, fingerprint, read_header
from ..organism import load_prompts
from ..report import build_report
from .common import (
    add_model_arguments,
    add_overwrite_argument,
    add_plain_text_argument,
    chat_template_from_args,
    check_out,
    load_model_from_args,
    plain_texts_from_args,
    read_records,
    resolve_prompts,
    result_options,
)

INTERVENTIONS = ("ablate", "add", "orthogonalize")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("prompts (JSON/JSONL/CSV/Parquet/TXT file, datasets id, or organism:KIND:SPLIT)")
    g.add_argument("--harmful", default=None, help="harmful instructions (default with the organism: its test split)")
    g.add_argument("--harmless", default=None, help="harmless instructions (default with the organism: test split)")
    g.add_argument("--borderline", default=None, help="borderline instructions (optional; organism: test split)")
    g.add_argument("--column", default=None, help="column holding the instruction (default: recognised)")
    add_plain_text_argument(g)
    g.add_argument(
        "--instruction-data",
        default=None,
        help="JSON/JSONL with instruction + output/reply/response, for the instruction CE loss (optional)",
    )
    g = p.add_argument_group("intervention")
    g.add_argument("--direction", default=None, help="direction.safetensors or its folder (omit: baseline only)")
    g.add_argument(
        "--intervention",
        default="all",
        help="comma-separated: ablate, add, orthogonalize; 'all' (default) or 'none' (baseline only)",
    )
    g.add_argument("--coeff", type=number(float), default=1.0, help="activation-addition coefficient c in x + c·r")
    g.add_argument("--positions", choices=("all", "prompt"), default="all", help="where activation addition applies")
    g = p.add_argument_group("judges")
    g.add_argument("--refusal-tokens", default=None, help="refusal tokens for the logit judge (default: detected)")
    g.add_argument("--judge-model", default=None, help="local HF model folder used as an extra judge")
    g.add_argument("--judge-mode", choices=("auto", "chat", "classifier"), default="auto", help="how to use it")
    g.add_argument("--judge-kind", choices=("auto", "refusal", "safety"), default="auto", help="what it answers")
    g.add_argument(
        "--judge-method",
        choices=("logits", "generate"),
        default=None,
        help="chat judges: compare answer-token logits, or generate and read the answer (default: generate for "
        "safety judges, logits otherwise)",
    )
    g.add_argument("--judge-label", default=None, help="classifier label meaning refusal/unsafe (default: guessed)")
    g = p.add_argument_group("evaluation")
    add_dataclass_arguments(g, EvalSettings)
    g = p.add_argument_group("generation backend")
    g.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="generate the replies with transformers (hf) or vLLM (pip install vllm; for large prompt sets). "
        "vLLM runs no hooks: the baseline uses the model folder, ablation and orthogonalized a weight-"
        "orthogonalized copy written to a temporary folder (TMPDIR; as large as the model), and activation "
        "addition is not available. Judges, KL and CE still run on the HF model",
    )
    g.add_argument(
        "--vllm-args",
        default=None,
        help="JSON object of extra vllm.LLM arguments, e.g. '{\"tensor_parallel_size\": 4}' "
        "(gpu_memory_utilization defaults to 0.5 here, leaving room for the HF model)",
    )
    p.add_argument("--out", required=True, help="output folder (results.json, completions.jsonl, report.html)")
    add_overwrite_argument(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an evaluation of the same --out that was killed (its replies so far are kept beside --out)",
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html and the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _interventions(spec: str, has_direction: bool) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if items in (["none"], []):
        return []
    if items == ["all"]:
        return list(INTERVENTIONS) if has_direction else []
    bad = [i for i in items if i not in INTERVENTIONS]
    if bad:
        raise UserError(
            f"--intervention {','.join(bad)} is unknown; choose from {', '.join(INTERVENTIONS)}, all, none."
        )
    if not has_direction:
        raise UserError(f"--intervention {spec} needs --direction FILE (a direction computed on this model).")
    return items


def _vllm_args(text: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"gpu_memory_utilization": 0.5}
    if text:
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--vllm-args is not valid JSON ({exc}); give a JSON object.") from None
        if not isinstance(extra, dict):
            raise UserError("--vllm-args must be a JSON object, e.g. '{\"tensor_parallel_size\": 2}'.")
        kwargs.update(extra)
    return kwargs


def _check_vllm(args: argparse.Namespace, chosen: list[str]) -> dict[str, Any]:
    """Fail fast (before loading anything) when the vLLM backend cannot run; returns the vllm.LLM arguments."""
    from ..evaluation.vllm_backend import import_vllm, vllm_dtype

    import_vllm()
    vllm_dtype(args.dtype)
    kwargs = _vllm_args(args.vllm_args)
    src = resolve_model_path(args.model)
    if {"ablate", "orthogonalize"} & set(chosen) and not Path(src).exists():
        raise UserError(
            f"--backend vllm writes an orthogonalized copy of the model, which needs a local folder; download {src} "
            "first (e.g. hf download ID --local-dir DIR) and pass --model DIR."
        )
    return kwargs


def _vllm_original(args: argparse.Namespace, model: Any, tokenizer: Any, tmp: str, quiet: bool) -> str:
    """The checkpoint vLLM loads as the original model: the model's folder when it is a plain HF folder, else
    (a GGUF file, a real model by name, a base model + adapter) the weights loaded here, saved as a HF folder,
    so vLLM runs exactly the model the hf backend would."""
    src = resolve_model_path(args.model)
    if not Path(src).exists() or Path(src).is_dir() and not is_real_model_name(str(args.model)):
        return src  # a hub id (vLLM fetches it) or a plain HF folder
    out = Path(tmp) / "original"
    if not quiet:
        print(f"writing the loaded model as a HF checkpoint for vLLM to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@contextmanager
def _generator(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    direction: Direction | None,
    conditions: dict[str, Any],
    descriptions: dict[str, dict[str, Any]],
    llm_kwargs: dict[str, Any],
    seed: int,
) -> Iterator[Any]:
    """None for --backend hf; for vllm, a generator over the original and (if needed) orthogonalized checkpoint."""
    if args.backend != "vllm":
        yield None
        return
    from ..direction.orthogonalize import orthogonalize_checkpoint
    from ..evaluation.vllm_backend import CHECKPOINT_OF, VLLMGenerator

    with tempfile.TemporaryDirectory(prefix="refusal-lens-vllm-") as tmp:
        paths = {"original": _vllm_original(args, model, tokenizer, tmp, args.quiet)}
        if direction is not None and any(CHECKPOINT_OF.get(c) == "orthogonalized" for c in conditions):
            paths["orthogonalized"] = str(Path(tmp) / "orthogonalized")
            if not args.quiet:
                print(f"writing the orthogonalized checkpoint for vLLM to {paths['orthogonalized']}")
            orthogonalize_checkpoint(
                paths["original"], direction.vector, paths["orthogonalized"], trust_remote_code=args.trust_remote_code
            )
        for cond in conditions:
            descriptions.setdefault(cond, {})["generation"] = {"backend": "vllm", "checkpoint": CHECKPOINT_OF[cond]}
        gen = VLLMGenerator(
            {c: paths[CHECKPOINT_OF[c]] for c in conditions},
            tokenizer,
            model=model,
            dtype=args.dtype,
            seed=seed,
            trust_remote_code=args.trust_remote_code,
            llm_kwargs=llm_kwargs,
        )
        try:
            yield gen
        finally:
            gen.close()


def _organism_data(args: argparse.Namespace) -> bool:
    """Whether the organism's corpus supplies the CE data: only for the organism itself (its corpus says
    nothing about another model's loss, even on organism prompt sets)."""
    return is_organism_model(args.model)


def _pairs(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    if args.instruction_data is None:
        if _organism_data(args):
            from ..organism import chat_pairs

            return [(c["instruction"], c["reply"]) for c in chat_pairs("test") if c["kind"] == "harmless"]
        return None
    pairs = []
    for r in read_records(args.instruction_data, "--instruction-data"):
        reply = next(
            (r[k] for k in ("output", "reply", "response", "completion") if isinstance(r, dict) and k in r), None
        )
        if not isinstance(r, dict) or "instruction" not in r or reply is None:
            raise UserError(
                f"--instruction-data {args.instruction_data}: each record needs 'instruction' and "
                "'output'/'reply'/'response'; fix the file."
            )
        if str(reply).strip():
            pairs.append((str(r["instruction"]), str(reply)))
    if not pairs:
        raise UserError(f"--instruction-data {args.instruction_data} holds no pairs; give a non-empty file.")
    return pairs


def run(args: argparse.Namespace) -> int:
    # Check every input before loading the model or generating anything.
    inputs = check_out(args)
    sets = {
        "harmful": resolve_prompts(args, "harmful", "test"),
        "harmless": resolve_prompts(args, "harmless", "test"),
    }
    if args.borderline is not None or args.model is None:
        sets["borderline"] = load_prompts(args.borderline or "organism:borderline:test", column=args.column)
    plain, pairs = plain_texts_from_args(args), _pairs(args)
    missing = [f"--{n} FILE" for n, v in (("plain-text", plain), ("instruction-data", pairs)) if v is None]
    settings = dataclass_from_args(EvalSettings, args)
    chosen = _interventions(args.intervention, args.direction is not None)
    llm_kwargs = _check_vllm(args, chosen) if args.backend == "vllm" else {}
    direction = Direction.load(args.direction) if args.direction else None
    template = chat_template_from_args(args)
    judges = []
    if args.judge_model:
        from ..evaluation.judges import load_model_judge

        judges.append(
            load_model_judge(
                args.judge_model,
                mode=args.judge_mode,
                kind=args.judge_kind,
                device=args.device,
                label=args.judge_label,
                **({"method": args.judge_method} if args.judge_method else {}),
            )
        )
    if missing:  # stated, not silent: the organism's corpus is no stand-in for another model's data
        print(
            f"note: CE losses on {' and '.join(m.split()[0].removeprefix('--') for m in missing)} are not measured "
            f"for this model; pass {' and '.join(missing)} (data for this model) to measure them.",
            file=sys.stderr,
        )
    model, tokenizer = load_model_from_args(args)
    if direction is not None:
        direction.check(model, str(args.direction))
    ids = parse_refusal_tokens(tokenizer, args.refusal_tokens) if args.refusal_tokens else None
    from ..core.prompts import ChatFormatter

    fmt = ChatFormatter(tokenizer, system=args.system, chat_template=template)
    vllm_skipped: dict[str, str] = {}
    if args.backend == "vllm":
        from ..core.adapters import get_adapter
        from ..evaluation.vllm_backend import vllm_interventions

        explicit = args.intervention.strip() != "all"
        chosen, vllm_skipped = vllm_interventions(chosen, explicit, bool(get_adapter(model).post_norms))
    conditions, descriptions = standard_conditions(
        model, direction, chosen or ["none"], coeff=args.coeff, positions=args.positions
    )
    intervention_of = {"addition": "add", "ablation": "ablate"}
    for cond, reason in vllm_skipped.items():
        descriptions[cond] = {"intervention": intervention_of[cond], "skipped": reason}
    options = _result_options(args, fmt)
    prompts = {k: [(p.instruction, p.category) for p in v] for k, v in sets.items()}
    vector = None if direction is None else direction.vector.tolist()
    key = fingerprint({"options": options, "sets": prompts, "direction": vector})
    _check_resumable(args, key)
    with (
        staging_dir(args.out, args.overwrite, inputs, resume=args.resume, keep_on_interrupt=True) as stage,
        _generator(args, model, tokenizer, direction, conditions, descriptions, llm_kwargs, settings.seed) as gen,
    ):
        journal = CompletionJournal(stage / "completions.jsonl", key, resume=args.resume)
        if len(journal):
            print(f"resuming: {len(journal)} batch(es) of replies already made")
        try:
            results, completions = evaluate_conditions(
                model,
                tokenizer,
                conditions,
                sets,
                settings,
                judges=judges,
                refusal_tokens=ids,
                formatter=fmt,
                plain_text=plain,
                instruction_pairs=pairs,
                direction=direction,
                descriptions=descriptions,
                progress=not args.quiet,
                return_completions=True,
                generator=gen,
                journal=journal,
            )
        except KeyboardInterrupt:
            print(f"kept {len(journal)} batch(es) of replies beside {args.out}; rerun with --resume to continue",
                  file=sys.stderr)  # fmt: skip
            raise
        journal.close()
        _finish(args, stage, results, completions, options)
    _print_summary(results)
    print(f"saved {args.out}/results.json, completions.jsonl" + ("" if args.no_report else ", report.html"))
    return 0


def _result_options(args: argparse.Namespace, fmt: Any) -> dict[str, Any]:
    """Every option that can change the results, plus the chat template's hash and the context limit."""
    return result_options(args) | {"chat_template_sha256": fmt.template_hash, "max_prompt_tokens": fmt.limit}


def _check_resumable(args: argparse.Namespace, key: str) -> None:
    """Refuse --resume onto replies made with other inputs before the staging folder is touched."""
    stale = stale_stage(args.out)
    if stale is not None and not args.resume:
        warnings.warn(
            f"discarding the replies of a killed evaluation of {args.out} ({stale.name}); pass --resume to continue "
            "it instead",
            stacklevel=2,
        )
        return
    if stale is None:
        if args.resume:
            print(f"--resume: no killed evaluation of {args.out} found; starting from the beginning")
        return
    head = read_header(stale / "completions.jsonl")
    if head is not None and head.get("fingerprint") != key:
        raise UserError(
            f"the killed evaluation of {args.out} ({stale.name}) used other inputs or options; rerun with the same "
            "options, or without --resume to discard it."
        )


def _finish(args: argparse.Namespace, stage: Path, results: dict, completions: list, options: dict) -> None:
    results["data"] = {
        "harmful": args.harmful or "organism:harmful:test",
        "harmless": args.harmless or "organism:harmless:test",
        "borderline": args.borderline or ("organism:borderline:test" if args.model is None else None),
        "plain_text": args.plain_text or ("organism:plain_text" if _organism_data(args) else None),
        "instruction_data": args.instruction_data or ("organism:chat_pairs:test" if _organism_data(args) else None),
    }
    extra = {
        "command": "evaluate", "model": args.model or "organism", "direction": args.direction, "backend": args.backend,
        "system": args.system, "options": options,
    }  # fmt: skip
    write_evaluation(stage, results, completions, extra, args.direction, None if args.no_report else build_report)


def _print_summary(results: dict[str, Any]) -> None:
    for cond, entry in results["conditions"].items():
        parts = []
        for set_name in results["prompt_sets"]:
            s = entry[set_name]
            parts.append(f"{set_name} {s['refusal_rate']:.1%} [{s['ci95'][0]:.0%}, {s['ci95'][1]:.0%}]")
        kl = entry.get("kl_harmless")
        print(f"{cond:>15}: " + ", ".join(parts) + ("" if kl is None else f", KL {kl:.3f}"))
