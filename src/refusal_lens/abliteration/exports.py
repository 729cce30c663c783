"""Exports of an abliteration: a PEFT LoRA adapter and a llama.cpp GGUF control vector.

**LoRA.** A strength-λ edit of a matrix ``W`` (model width on its output axis) is the rank-1 update
``ΔW = −λ u (uᵀW)``: a LoRA with ``A = uᵀW`` (1 × in), ``B = −λ u`` (d × 1), ``lora_alpha = r = 1``, so merging
it gives exactly the edited weights. Norm-preserving edits rescale each row and are not rank-1: their ``ΔW``
is approximated by its top singular vectors (``rank``), and the largest merge error is reported. Biases and
embeddings have no LoRA form here: an edit that touches them is refused (the merged checkpoint has them).

**Control vector.** llama.cpp's ``--control-vector`` adds ``direction.{l}`` to the output of decoder block
``l`` (0-based; llama.cpp rejects ``direction.0``, so block 0 cannot carry one). A constant addition cannot
reproduce a projection; what it can carry is the paper's activation-addition alternative: ``−c·r`` (raw
difference in means) added once, at the block whose output is the residual slot of the direction index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.errors import UserError
from ..core.io import atomic_path, atomic_save_safetensors, atomic_write_json
from ..direction.strengths import AblationPlan, project_rows


def lora_tensors(
    model: nn.Module, plan: AblationPlan, norm_preserving: bool = False, rank: int = 4
) -> tuple[dict[str, torch.Tensor], list[str], int, float]:
    """``(tensors, target module names, rank, max |merge − edit|)`` of the plan as a LoRA on ``model``.

    Reads the model's current (unedited) weights.
    """
    adapter = get_adapter(model)
    plan.check(adapter)
    if plan.embed:
        raise UserError("the plan edits the embeddings, which this LoRA export does not cover; use embed = 0.")
    groups = {(kind, layer): writers for kind, layer, writers in adapter.writer_groups()}
    r = 1 if not norm_preserving else rank
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    worst = 0.0
    for kind, layer, strength, u in plan.sites():
        writers = groups[(kind, layer)]
        if len(writers) != 1 or writers[0].axis != 0 or writers[0].param.ndim != 2:
            raise UserError(
                f"layer {layer}'s {kind} write is not one Linear without bias ({[w.name for w in writers]}); "
                "LoRA export covers plain out-projections only (use the merged checkpoint)."
            )
        w = writers[0]
        W = w.param.detach().double()
        uu = u.double().to(W.device)
        if norm_preserving:
            delta = project_rows(W, uu, 0, strength, True) - W
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            B, A = U[:, :r] * S[:r], Vh[:r]
        else:
            A, B = (uu @ W).unsqueeze(0), (-strength * uu).unsqueeze(1)
            delta = -strength * torch.outer(uu, uu @ W)
        worst = max(worst, float((B @ A - delta).abs().max()))
        module = w.name.removesuffix(".weight")
        targets.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(w.param.dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.to(w.param.dtype).contiguous()
    if not targets:
        raise UserError("the plan edits nothing; there is no LoRA to export.")
    return tensors, targets, r, worst


def save_lora(
    model: nn.Module, plan: AblationPlan, out_dir: str | os.PathLike, norm_preserving: bool = False, rank: int = 4
) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that ``peft`` loads (PeftModel.from_pretrained)."""
    tensors, targets, r, worst = lora_tensors(model, plan, norm_preserving, rank)
    out = Path(out_dir)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "r": r,
        "lora_alpha": r,  # scaling α/r = 1: the merge adds exactly B @ A
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    atomic_save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_json(out / "adapter_config.json", config)
    return {"rank": r, "modules": len(targets), "max_abs_merge_error": worst, "exact": not norm_preserving}


def control_vectors(directions_raw: torch.Tensor, index: float, scale: float = 1.0) -> dict[int, torch.Tensor]:
    """``{block: vector}``: ``−scale·r_s`` at the block whose output is residual slot ``s = round(index)``.

    The output of block ``b`` is the input (resid_pre) of block ``b + 1``, so slot ``s`` is block ``s − 1``. llama.cpp
    has no control vector for block 0, so slots 0 and 1 move to block 1 (slot 2).
    """
    n_blocks = directions_raw.shape[0] - 1
    if n_blocks < 2:
        raise UserError("a llama.cpp control vector needs a model with at least 2 blocks (block 0 has none).")
    block = min(max(int(round(index)) - 1, 1), n_blocks - 1)
    return {block: (-scale * directions_raw[block + 1]).float()}


def save_control_vector(
    vectors: dict[int, torch.Tensor], path: str | os.PathLike, model_hint: str, n_layers: int
) -> None:
    """A GGUF file with architecture ``controlvector`` and one tensor ``direction.{block}`` per block."""
    import gguf

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", n_layers)
        for block, vec in sorted(vectors.items()):
            writer.add_tensor(f"direction.{block}", vec.detach().cpu().float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_control_vector(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Read a control vector back with ``gguf``'s reader: ``{block: vector}``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy()).reshape(-1) for t in reader.tensors}


def reproduce_record(command: list[str], options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What ``reproduce.json`` holds: versions, data hashes, every option and the command line."""
    import importlib.metadata as md
    import shlex

    versions = {}
    for pkg in ("refusal-lens", "torch", "transformers", "safetensors", "peft", "gguf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"command": shlex.join(command), "options": options, "data": data, "versions": versions}


def model_card(summary: dict[str, Any]) -> str:
    """A short README.md for the abliterated checkpoint."""
    c = summary["chosen"]
    base = summary["baseline"]
    lines = [
        "---",
        "tags: [abliterated, refusal-lens]",
        "---",
        f"# Abliterated {summary['model']}",
        "",
        "Refusal removed with `refusal-lens abliterate` (directional ablation with per-layer strengths; see "
        "docs/abliteration.md). Measured on held-out search prompts:",
        "",
        "| | original | abliterated |",
        "|---|---|---|",
        f"| harmful prompts refused (greedy, {summary['check_tokens']} tokens, substring judge) | "
        f"{base['refusals_generated']}/{base['n_harmful_search']} | "
        f"{c['refusals_generated']}/{base['n_harmful_search']} |",
        f"| first-token KL on harmless prompts | 0 | {c['kl']:.4g} |",
        *_capability_rows(summary.get("capability")),
        "",
        "Point: `" + json.dumps(c["point"]) + "`",
        "",
        "Reproduce: see `reproduce.json` (command, options, data hashes, versions). The whole front is in "
        "`front.json` and `front.png`.",
        "",
        "This model no longer refuses harmful requests reliably. Use it for research on refusal, not to serve users.",
    ]
    return "\n".join(lines) + "\n"


def _capability_rows(capability: dict[str, Any] | None) -> list[str]:
    """Model-card table rows: plain-text CE loss and lm-eval accuracies, original vs edited."""
    if not capability:
        return []
    before, after = capability["original"], capability["edited"]
    rows = []
    if before.get("ce_loss_plain_text") is not None:
        rows.append(f"| CE loss on {before['n_plain_texts']} plain-text passages (nats/token) | "
                    f"{before['ce_loss_plain_text']:.4f} | {after['ce_loss_plain_text']:.4f} |")  # fmt: skip
    for task, metrics in sorted((before.get("lm_eval") or {}).items()):
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                other = after["lm_eval"][task].get(metric, float("nan"))
                rows.append(f"| lm-eval {task} {metric} (n = {metrics.get('n', 0):.0f}) | {metrics[metric]:.4f} | "
                            f"{other:.4f} |")  # fmt: skip
    return rows
