"""The organism's shipped analysis artifacts: its refusal direction and two SAEs (chat data vs plain text).

``refusal-lens organism artifacts`` rebuilds them into the checkpoint folder (about 3-5 CPU minutes):

* ``direction/`` — the selected refusal direction (``refusal-lens direction`` on the organism's splits);
* ``saes/chat`` and ``saes/text`` — equal-width, equal-token-budget SAEs at the direction's layer
  (``resid_pre``), one trained on chat-formatted conversations, one on plain pretraining-style text:
  the setting of Kissane et al. 2024, in miniature;
* ``saes/upstream`` — a chat-data SAE a few layers earlier, for the features upstream of refusal
  (Lee, Breck, Arditi 2025 read the refusal gradient at a layer before the direction's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config_args import at_least


@dataclass
class ArtifactRecipe:
    arch: str = "topk"
    """SAE architecture of both shipped SAEs."""
    width: int = field(default=1024, metadata=at_least(1))
    """Latents per SAE (8 × the organism's width)."""
    k: int = field(default=16, metadata=at_least(1))
    """Active latents per token (TopK)."""
    tokens: int = field(default=1_000_000, metadata=at_least(1))
    """Training tokens per SAE (the same budget for both)."""
    batch_size: int = field(default=2048, metadata=at_least(1))
    """Tokens per training step."""
    seed: int = 0
    """Seed of the SAE initialisation and data order."""
    upstream_offset: int = field(default=2, metadata=at_least(0))
    """The upstream-feature SAE (chat data) sits this many layers before the direction's layer."""


def build_artifacts(checkpoint: str | os.PathLike, recipe: ArtifactRecipe | None = None) -> dict[str, Any]:
    """Compute the direction and train the chat and text SAEs into ``checkpoint``; returns a summary."""
    from ..core.errors import UserError
    from ..core.io import atomic_write_json, staging_dir
    from ..core.models import load_model
    from ..direction.compute import DirectionConfig, compute_direction
    from ..organism import corpus_seed
    from ..organism.corpus import chat_pairs, load_split, plain_text
    from ..sae.base import SAEConfig
    from ..sae.formats import save_saelens
    from ..sae.source import ActivationSource, DataConfig
    from ..sae.trainer import TrainConfig, train_saes

    cfg = recipe or ArtifactRecipe()
    ckpt = Path(checkpoint)
    model, tok = load_model(ckpt)
    seed = corpus_seed(ckpt)  # a checkpoint trained with another seed is analysed on its own corpus
    texts = lambda kind, split: [r["instruction"] for r in load_split(kind, split, seed)]  # noqa: E731
    found = compute_direction(
        model, tok, texts("harmful", "train"), texts("harmless", "train"), texts("harmful", "val"),
        texts("harmless", "val"), config=DirectionConfig(seed=cfg.seed, fallback_drop_induce=True),
        data_info={"harmful": "organism:harmful:train", "harmless": "organism:harmless:train"},
    )  # fmt: skip
    if not found.found:
        raise UserError(f"no direction passed selection on {ckpt}:\n{found.selection.explanation}")
    with staging_dir(ckpt / "direction", overwrite=True, flag="--checkpoint") as stage:
        found.direction.save(stage)
        atomic_write_json(stage / "selection.json", found.selection.to_json())
    layer = found.direction.layer
    chats = [[{"role": "user", "content": c["instruction"]}, {"role": "assistant", "content": c["reply"]}]
             for c in chat_pairs("train", seed)]  # fmt: skip
    summary: dict[str, Any] = {"direction": {"layer": layer, "position": found.direction.position}, "saes": {}}
    upstream_layer = max(0, layer - cfg.upstream_offset)
    for name, data, at in (("chat", "chat", layer), ("text", "text", layer), ("upstream", "chat", upstream_layer)):
        data_cfg = DataConfig(data=data, seed=cfg.seed)
        source = ActivationSource(model, tok, at, "resid_pre", data_cfg, cfg.batch_size, plain_text(seed), chats)
        train_cfg = TrainConfig(tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed)
        sae_cfg = SAEConfig(arch=cfg.arch, width=cfg.width, k=cfg.k, d_in=source.d_in)
        sae = train_saes({cfg.arch: sae_cfg}, source, train_cfg)[cfg.arch]
        meta = source.describe() | {"model_name": "refusal-lens organism", "training_tokens": cfg.tokens}
        with staging_dir(ckpt / "saes" / name, overwrite=True, flag="--checkpoint") as stage:
            save_saelens(sae, stage, meta)
        summary["saes"][name] = str(ckpt / "saes" / name)
    return summary
