"""Stage 1, the model organism (its corpus, tokenizer, training recipe and shipped checkpoint). Imports core.

The model organism: a tiny Llama chat model trained from scratch in which refusal is learned.

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

from ..core.data import ORGANISM_PREFIX, Prompt, finish_prompts
from ..core.data import load_prompts as load_prompt_file
from ..core.errors import UserError
from ..core.models import organism_checkpoint
from .corpus import Corpus, build_corpus, chat_pairs, load_split, plain_text

__all__ = [
    "Corpus",
    "build_corpus",
    "chat_pairs",
    "corpus_seed",
    "load_prompts",
    "load_split",
    "path",
    "plain_text",
    "train_organism",
]


def path() -> Path:
    """The shipped organism checkpoint folder; raises :class:`UserError` if it is missing or incomplete."""
    return organism_checkpoint()


def load_prompts(
    source: str | Path, column: str | None = None, n: int | None = None, seed: int = 0, split: str = "train"
) -> list[Prompt]:
    """Prompts from ``organism:KIND:SPLIT`` (e.g. ``organism:harmful:test``), or from a file or hub id.

    Everything else is read by :func:`refusal_lens.core.data.load_prompts`, with the same arguments.
    """
    text = str(source)
    if not text.startswith(ORGANISM_PREFIX):
        return load_prompt_file(source, column, n=n, seed=seed, split=split)
    parts = text[len(ORGANISM_PREFIX) :].split(":")
    if len(parts) != 2:
        raise UserError(f"{text}: use organism:KIND:SPLIT, e.g. organism:harmful:test.")
    records = load_split(parts[0], parts[1])
    return finish_prompts([Prompt(r["instruction"], r.get("category")) for r in records], text, n, seed)


def train_organism(
    out: Path, seed: int = 0, steps: int | None = None, quiet: bool = False, **options: Any
) -> dict[str, Any]:
    """Train an organism with ``seed`` (and optionally a different total number of ``steps``) into ``out``.

    Returns the content of the ``organism.json`` written beside the weights (recipe, corpus manifest,
    training log, measured refusal rates). ``options`` go to :func:`.train.train_organism` (``overwrite``,
    ``inputs``, ``measure``).
    """
    # Imported lazily: training pulls in tokenizers and the model code, which plain corpus users don't need.
    from .train import train_organism as _train

    return _train(Path(out), seed=seed, steps=steps, quiet=quiet, **options)


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
