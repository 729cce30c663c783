"""What ``refusal-lens abliterate`` writes: the chosen point's merged checkpoint, the front, exports, a card.

``DIR/``: ``config.json`` + ``model.safetensors`` + tokenizer (the merged, edited model), ``front.json`` (every
scored point with its parameters and both objectives, the checked front, the chosen point), ``front.png``,
``points.jsonl`` (the search checkpoint), ``directions.safetensors`` (per-slot directions and harmless means, from
which every point's edit can be rebuilt), ``README.md`` (model card), ``reproduce.json``, and with ``--export``:
``lora/`` (PEFT adapter) and ``control_vector.gguf``; for a model loaded from GGUF, ``model.gguf`` (the input file
with the edited tensors, :mod:`refusal_lens.core.gguf_export`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

from ..core.gguf_export import write_edited_gguf  # noqa: E402
from ..core.io import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    provenance,
    staging_dir,
)  # noqa: E402
from ..core.models import model_name  # noqa: E402
from ..direction.strengths import edit_weights  # noqa: E402
from .exports import (  # noqa: E402
    control_vectors,
    model_card,
    reproduce_record,
    save_control_vector,
    save_lora,
)
from .pipeline import AbliterationResult  # noqa: E402

EXPORTS = ("lora", "control-vector")


def front_figure(
    path: str | os.PathLike,
    fronts: dict[str, list[tuple[float, float]]],
    scatter: list[tuple[float, float]] | None = None,
    chosen: tuple[float, float] | None = None,
    xlabel: str = "first-token KL on harmless prompts",
    ylabel: str = "harmful prompts refused (fraction)",
) -> None:
    """Fronts as step lines over (KL, refusal), evaluated points as grey dots; written atomically as PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if scatter:
        ax.scatter([p[0] for p in scatter], [p[1] for p in scatter], s=6, c="#bbbbbb", label="scored points")
    for (name, pts), color in zip(fronts.items(), ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        pts = sorted(pts)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", marker="o", color=color, label=name)
    if chosen:
        ax.scatter([chosen[0]], [chosen[1]], s=80, facecolors="none", edgecolors="k", label="chosen")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def write_outputs(
    out_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer: object,
    result: AbliterationResult,
    checkpoint: str | os.PathLike,
    exports: Sequence[str],
    command: list[str],
    options: dict[str, Any],
    norm_preserving: bool = False,
    force: bool = False,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    gguf_dtype: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build ``out_dir`` atomically (edits ``model`` in place at the end); returns the summary JSON.

    A non-empty ``out_dir`` is replaced only with ``overwrite``; one overlapping ``inputs`` is always refused.
    ``gguf_dtype`` (a model loaded from GGUF): also ``model.gguf``, the input file with the edited tensors.
    ``extra``: more summary entries (the capability check).
    """
    plan = result.point.plan(result.directions)
    chosen = result.chosen
    summary: dict[str, Any] = {
        "model": model_name(model),
        "chosen": chosen,
        "baseline": result.info["baseline"],
        "check_tokens": options.get("check_tokens"),
        "front": result.front,
        **{k: v for k, v in result.info.items() if k not in ("baseline", "checked")},
        **(extra or {}),
    }
    with staging_dir(out_dir, overwrite, inputs) as stage:
        exported: dict[str, Any] = {}
        if "lora" in exports:  # from the original weights, before the merge below edits them
            exported["lora"] = save_lora(model, plan, stage / "lora", norm_preserving)
        if "control-vector" in exports:
            vectors = control_vectors(result.directions.raw, result.point.index)
            save_control_vector(vectors, stage / "control_vector.gguf", model_name(model), result.directions.n_layers)
            exported["control_vector"] = {"blocks": sorted(vectors), "file": "control_vector.gguf"}
        summary["exports"] = exported
        atomic_save_safetensors(  # every point of front.json can be rebuilt from these (Point.plan)
            {"raw": result.directions.raw, "harmless_mean": result.directions.harmless_mean},
            stage / "directions.safetensors",
            {"format": "refusal-lens-direction-set"},
        )
        edited = edit_weights(model, plan, norm_preserving, force)
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        if gguf_dtype is not None:  # after the edit: the changed tensors are found by comparing with the file
            exported["gguf"] = write_edited_gguf(model, stage / "model.gguf", gguf_dtype)
        atomic_write_json(
            stage / "front.json",
            provenance(points=result.rows, checked=result.info["checked"], front=result.front, chosen=chosen),
        )
        front_figure(
            stage / "front.png",
            {"front (checked by generation)": [(r["kl"], r["refusal_generated"]) for r in result.front],
             "front (first-token estimate)": [(r["kl"], r["refusal"]) for r in _proxy_front(result.rows)]},
            scatter=[(r["kl"], r["refusal"]) for r in result.rows],
            chosen=(chosen["kl"], chosen["refusal_generated"]),
        )  # fmt: skip
        data = {"sha256": result.info["data_sha256"], "n_prompts": result.info["n_prompts"]}
        atomic_write_json(stage / "reproduce.json", provenance(**reproduce_record(command, options, data)))
        atomic_write_json(stage / "refusal_lens_abliteration.json", provenance(**summary, edited=edited))
        atomic_write_text(stage / "README.md", model_card(summary))
        shutil.copy2(checkpoint, stage / "points.jsonl")
    Path(checkpoint).unlink(missing_ok=True)  # our own resume file; the run is complete and DIR has a copy
    return summary


def _proxy_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from .search import pareto_front

    return pareto_front(rows)
