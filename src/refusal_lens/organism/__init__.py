"""The model organism: a tiny Llama chat model trained from scratch in which refusal is learned.

It is the default model of every command and the fixture of the integration tests. The shipped
checkpoint lives in ``checkpoint/`` (package data); :func:`train_organism` re-creates one from a seed.

Public API:

* :func:`path` -- the shipped checkpoint folder (loadable with ``AutoModelForCausalLM.from_pretrained``).
* :func:`train_organism` -- train and save a new organism (used by ``refusal-lens organism train``).
* :func:`build_corpus`, :func:`load_split`, :func:`plain_text`, :func:`chat_pairs` -- the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .corpus import Corpus, build_corpus, chat_pairs, load_split, plain_text

__all__ = ["Corpus", "build_corpus", "chat_pairs", "corpus_seed", "load_split", "path", "plain_text", "train_organism"]

_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def path() -> Path:
    """The shipped organism checkpoint folder; raises :class:`UserError` if it is missing or incomplete."""
    missing = [f for f in _REQUIRED if not (_CHECKPOINT / f).is_file()]
    if missing:
        raise UserError(
            f"the shipped organism checkpoint {_CHECKPOINT} is missing ({', '.join(missing)}); reinstall "
            "refusal-lens or train one with `refusal-lens organism train --out DIR` and pass --model DIR."
        )
    return _CHECKPOINT


def train_organism(out: Path, seed: int = 0, steps: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train an organism with ``seed`` (and optionally a different total number of ``steps``) into ``out``.

    Returns the content of the ``organism.json`` written beside the weights (recipe, corpus manifest,
    training log, measured refusal rates).
    """
    # Imported lazily: training pulls in tokenizers and the model code, which plain corpus users don't need.
    from .train import train_organism as _train

    return _train(Path(out), seed=seed, steps=steps, quiet=quiet)


def shipped_direction() -> Path:
    """The organism's selected refusal direction (``direction.safetensors``), built by ``organism artifacts``."""
    found = path() / "direction" / "direction.safetensors"
    if not found.is_file():
        raise UserError(f"{found} is missing; build it with `refusal-lens organism artifacts` or pass --direction.")
    return found


def corpus_seed(checkpoint: str | Path | None = None) -> int:
    """The corpus seed an organism checkpoint was trained with (0 for the shipped one or a non-organism)."""
    info = Path(checkpoint or path()) / "organism.json"
    if not info.is_file():
        return 0
    return int(json.loads(info.read_text()).get("seed", 0))


def shipped_saes(checkpoint: str | Path | None = None) -> dict[str, Path]:
    """The organism's SAEs: ``chat`` and ``text`` at the direction's layer, ``upstream`` (chat data) earlier.

    ``checkpoint`` selects another organism folder built by ``organism artifacts`` (default: the shipped one).
    """
    root = Path(checkpoint) if checkpoint is not None else path()
    saes = {name: root / "saes" / name for name in ("chat", "text", "upstream")}
    missing = [str(p) for p in saes.values() if not (p / "cfg.json").is_file()]
    if missing:
        raise UserError(
            f"{', '.join(missing)} missing; build them with `refusal-lens organism artifacts` or pass --sae."
        )
    return saes
