"""Weight orthogonalization: remove a direction from every matrix that writes into the residual stream.

``W ← W − r̂ r̂ᵀ W`` for token/positional embeddings, attention out-projections, MLP down-projections
(every expert's in MoE layers) and their biases. The edited model never writes ``r̂`` into the residual
stream, which is exactly directional ablation by hooks (Arditi et al., App. E) for pre-norm families.

* :func:`orthogonalize_model` edits a loaded model in place (unties tied embeddings first, so the
  unembedding keeps its original weights).
* :func:`orthogonalize_checkpoint` streams over a checkpoint's safetensors shards one tensor at a time, so
  a model larger than memory can be edited; peak memory is about one shard.

Families with post-sublayer norms (Gemma-2/3, OLMo-2) normalise a sublayer's output *after* the matrices
we edit, which re-introduces a component along ``r̂``: the edit is not exact there and is refused unless
``force=True``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.adapters import ArchitectureAdapter, get_adapter
from ..core.errors import UserError
from ..core.io import atomic_save_safetensors, atomic_write_json, check_out_dir, provenance, read_json, staging_dir

PathLike = str | os.PathLike

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def project_out_along(tensor: torch.Tensor, unit: torch.Tensor, axis: int, chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """Remove ``unit``'s component from ``tensor`` along ``axis`` (computed in float64, cast back).

    Rows are processed in chunks of about ``chunk_bytes`` of float64, so the temporaries stay small next to
    a large embedding matrix (streaming's peak memory is about one shard).
    """
    moved = tensor.movedim(axis, -1)
    chunk_rows = max(1, chunk_bytes // (8 * moved.shape[-1]))
    out = torch.empty(moved.shape, dtype=tensor.dtype, device=tensor.device)
    u = unit.double().to(tensor.device)
    rows_in, rows_out = moved.reshape(-1, moved.shape[-1]), out.view(-1, moved.shape[-1])
    for start in range(0, rows_in.shape[0], chunk_rows):
        block = rows_in[start : start + chunk_rows].double()
        rows_out[start : start + chunk_rows] = (block - torch.outer(block @ u, u)).to(tensor.dtype)
    return out.movedim(-1, axis).contiguous()


MIN_NORM = 1e-6


def unit_direction(direction: torch.Tensor, name: str = "direction") -> torch.Tensor:
    """``direction / ||direction||`` in float64; refuses a zero, near-zero or non-finite direction.

    Dividing by a zero norm would write NaN into every edited weight (and an ablation would be a no-op).
    """
    vec = direction.detach().double()
    norm = float(vec.norm())
    if not torch.isfinite(vec).all() or norm < MIN_NORM:
        raise UserError(
            f"{name} has norm {norm:.3g} (zero, near zero or not finite), so it defines no direction; "
            "re-create it with `refusal-lens direction`."
        )
    return vec / norm


def refuse_inexact(adapter: ArchitectureAdapter, force: bool) -> None:
    """Raise unless the weight edit is exact for this family (or ``force`` is set)."""
    if adapter.post_norms and not force:
        raise UserError(
            f"{adapter.family!r} normalises sublayer outputs after the matrices this edit changes, so weight "
            "orthogonalization is not exact (use hook ablation instead); pass --force to edit anyway."
        )


def refuse_offloaded(adapter: ArchitectureAdapter) -> None:
    """Raise if a residual writer's weights are not in memory (accelerate CPU/disk offload keeps them on "meta").

    Editing the placeholder would change nothing the model computes with, silently.
    """
    offloaded = [w.name for w in adapter.residual_writers() if w.param.is_meta]
    if offloaded:
        raise UserError(
            f"{len(offloaded)} residual-writing weights (e.g. {offloaded[0]}) are offloaded by --device-map, so they "
            "cannot be edited in memory; use hook ablation, or write an edited checkpoint with "
            "`refusal-lens orthogonalize` (it streams over the shards) and load that."
        )


def untie_embeddings(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> bool:
    """Give the unembedding its own copy of the weights (on its own device); returns True if they were tied."""
    adapter = adapter or get_adapter(model)
    if not adapter.tied_embeddings():
        return False
    head_device = adapter.lm_head.weight.device
    adapter.lm_head.weight = nn.Parameter(adapter.embed.weight.detach().to(head_device, copy=True), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}  # transformers v5 would re-tie on save otherwise
    return True


@torch.no_grad()
def orthogonalize_model(model: nn.Module, direction: torch.Tensor, force: bool = False) -> list[str]:
    """Orthogonalize ``model``'s residual writers against ``direction`` in place; returns the edited names."""
    adapter = get_adapter(model)
    refuse_inexact(adapter, force)
    refuse_offloaded(adapter)
    unit = unit_direction(direction)
    untie_embeddings(model, adapter)
    edited = []
    for writer in adapter.residual_writers():
        writer.param.copy_(project_out_along(writer.param.data, unit, writer.axis))
        edited.append(writer.name)
    return edited


# ---------------------------------------------------------------------------------------------- streaming
# transformers v5 fuses experts in memory (``mlp.experts.down_proj [E, d, d_expert]``) but saves them per
# expert, under the family's legacy names (Mixtral: ``block_sparse_moe.experts.3.w2.weight``).
_EXPERT_KEY = re.compile(r"^(?P<layer>.*\.\d+)\.[a-z_]+\.experts\.\d+\.(?:down_proj|w2)\.weight$")


def _writer_axes(config_dir: Path, trust_remote_code: bool) -> tuple[dict[str, int], ArchitectureAdapter, str]:
    """Names and projection axes of the residual writers, from a model skeleton on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    adapter = get_adapter(skeleton)
    axes = {w.name: w.axis for w in adapter.residual_writers()}
    embed_name = next(n for n, p in skeleton.named_parameters() if p is adapter.embed.weight)
    return axes, adapter, embed_name


def _match(key: str, axes: dict[str, int], prefix: str) -> int | None:
    """The projection axis for a checkpoint tensor, or None if it is not a residual writer."""
    for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if name in axes:
            return axes[name]
    m = _EXPERT_KEY.match(key)
    if m and any(n.startswith(f"{m['layer']}.") and n.endswith("experts.down_proj") for n in axes):
        return 0  # one expert's Linear down-projection [d_model, d_expert] in the per-expert layout
    return None


def _shard_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors shard; a missing, truncated or corrupted one is a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint shard {path} is missing; re-download or re-save the model.")
    try:
        with safe_open(path, "pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # SafetensorError for bad headers, OSError for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint shard {path} is not a readable safetensors file ({first}); re-download or re-save the model."
        ) from None
    return keys


def check_shards(src_dir: Path, weight_map: dict[str, str]) -> None:
    """Read every shard's header (names and data offsets within the file) before anything is written."""
    for shard in sorted(set(weight_map.values())):
        keys = set(_shard_keys(src_dir / shard))
        missing = [k for k, s in weight_map.items() if s == shard and k not in keys]
        if missing:
            raise UserError(
                f"checkpoint shard {src_dir / shard} lacks {missing[0]} listed in its index; re-download the model."
            )


def orthogonalize_checkpoint(
    src: str | os.PathLike,
    direction: torch.Tensor,
    out: str | os.PathLike,
    force: bool = False,
    trust_remote_code: bool = False,
    extra_provenance: dict | None = None,
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
) -> dict:
    """Stream over ``src``'s safetensors shards, orthogonalize residual writers, write a checkpoint to ``out``.

    Only one shard is held in memory at a time. Tied embeddings are untied by writing the original
    embedding as ``lm_head.weight`` into an extra shard. Returns a summary (edited tensor names, shards).
    Every shard's header is read before anything is written; ``out`` may not overlap ``src`` or ``inputs``
    and replaces a non-empty folder only with ``overwrite``.
    """
    src_dir = Path(src)
    check_out_dir(out, overwrite, [src_dir, *inputs])
    if not (src_dir / "config.json").is_file():
        raise UserError(f"model folder {src_dir} has no config.json; point --model at a HF model folder.")
    index_path = src_dir / INDEX_NAME
    if index_path.is_file():
        weight_map: dict[str, str] = read_json(index_path, "checkpoint index").get("weight_map", {})
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"checkpoint index {index_path} has no weight_map; re-save the model.")
    elif (src_dir / WEIGHTS_NAME).is_file():
        weight_map = dict.fromkeys(_shard_keys(src_dir / WEIGHTS_NAME), WEIGHTS_NAME)
    else:
        raise UserError(f"model folder {src_dir} has no safetensors weights; convert it with save_pretrained first.")
    axes, adapter, embed_name = _writer_axes(src_dir, trust_remote_code)
    refuse_inexact(adapter, force)
    if direction.shape != (adapter.d_model,):
        raise UserError(
            f"direction has shape {list(direction.shape)} but the model's hidden size is {adapter.d_model}; "
            "use a direction computed on this model."
        )
    prefix = next(iter(axes)).split(".")[0]
    unit = unit_direction(direction)
    check_shards(src_dir, weight_map)
    config = read_json(src_dir / "config.json", "model config")
    tied = adapter.tied_embeddings() and not any(k.endswith("lm_head.weight") for k in weight_map)
    edited: list[str] = []
    with staging_dir(out, overwrite, [src_dir, *inputs]) as stage:
        for item in src_dir.iterdir():  # tokenizer, generation config, ...
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX_NAME, "config.json"):
                shutil.copy2(item, stage / item.name)
        for shard in sorted(set(weight_map.values())):
            tensors = {}
            with safe_open(src_dir / shard, "pt") as fh:
                metadata = fh.metadata()
                for key in fh.keys():
                    tensor = fh.get_tensor(key)
                    axis = _match(key, axes, prefix)
                    if tied and key in (embed_name, embed_name.removeprefix(f"{prefix}.")):
                        untied_head = tensor.clone()  # the unembedding keeps the original weights
                    if axis is not None:
                        tensor = project_out_along(tensor, unit, axis)
                        edited.append(key)
                    tensors[key] = tensor
            if tied and not index_path.is_file():
                tensors["lm_head.weight"] = untied_head  # single-file checkpoints stay single-file
            atomic_save_safetensors(tensors, stage / shard, metadata or {"format": "pt"})
            del tensors
        if not edited:
            raise UserError(f"no residual-writing tensors were found in {src_dir}; is this checkpoint a causal LM?")
        if tied:
            if index_path.is_file():
                atomic_save_safetensors(
                    {"lm_head.weight": untied_head}, stage / "lm_head.safetensors", {"format": "pt"}
                )
                weight_map = {**weight_map, "lm_head.weight": "lm_head.safetensors"}
            config["tie_word_embeddings"] = False
            if isinstance(config.get("text_config"), dict):
                config["text_config"]["tie_word_embeddings"] = False
        if index_path.is_file():
            total = sum((stage / s).stat().st_size for s in set(weight_map.values()))
            atomic_write_json(stage / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(stage / "config.json", config)
        summary = {"edited": edited, "untied_embeddings": tied, "shards": sorted(set(weight_map.values()))}
        atomic_write_json(
            stage / "refusal_lens_orthogonalization.json",
            provenance(source_model=str(src_dir), method="streaming", **summary, **(extra_provenance or {})),
        )
    return summary


def save_orthogonalized(
    model: nn.Module,
    tokenizer: object,
    out: str | os.PathLike,
    extra_provenance: dict | None = None,
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
    gguf_dtype: str | None = None,
) -> Path:
    """Save an (already orthogonalized) model as a normal HF checkpoint with a provenance file.

    With ``gguf_dtype`` (a model loaded from GGUF) also ``model.gguf``: the input file with the edited tensors.
    """
    extra = dict(extra_provenance or {})
    with staging_dir(out, overwrite, inputs) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        if gguf_dtype is not None:
            from ..core.gguf_export import write_edited_gguf

            extra["gguf_export"] = write_edited_gguf(model, stage / "model.gguf", gguf_dtype)
        atomic_write_json(stage / "refusal_lens_orthogonalization.json", provenance(method="in_memory", **extra))
    return Path(out)
