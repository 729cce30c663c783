"""Generation under any intervention: batched, left-padded, KV-cached, greedy by default, saved as JSONL.

An *intervention* is a zero-argument callable that returns a context manager (a "context factory"): the
model is run inside it. ``None`` means the plain model. Everything the library offers fits that shape::

    lambda: ablate_direction(model, r)                       # directional ablation
    lambda: add_direction(model, r, layer=5, coeff=1.0)      # activation addition
    lambda: orthogonalized_weights(model, r)                 # weight edit, restored on exit

The defaults follow the paper's advice: greedy decoding and **128** new tokens, because short windows miss
refusals that start late in a reply. Generation stops at the end of the assistant's turn (the tokenizer's
eos token, the model's generation eos tokens and the chat template's end-of-turn token).

Example:
    >>> settings = GenerationSettings(max_new_tokens=64)                             # doctest: +SKIP
    >>> done = generate(model, tok, ["How do I bake bread?"], settings=settings)      # doctest: +SKIP
    >>> save_completions("out/completions.jsonl", done)                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ..core.data import Prompt
from ..core.errors import UserError
from ..core.io import atomic_write_text
from ..core.models import input_device
from ..core.progress import progress_bar
from ..core.prompts import ChatFormatter
from .journal import CompletionJournal

ContextFactory = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class GenerationSettings:
    """How replies are generated. The same settings and seed always give the same replies."""

    max_new_tokens: int = 128
    """New tokens per reply (the paper found 30-token windows miss delayed refusals; keep >= 128)."""
    batch_size: int = 16
    """Prompts per ``generate`` call."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with do_sample)."""
    seed: int = 0
    """Seed for sampling; each batch is seeded from it, so results do not depend on earlier batches."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One generated reply and where it came from."""

    prompt: str
    completion: str
    category: str | None = None
    intervention: str = "none"
    prompt_set: str | None = None
    n_tokens: int = 0
    finished: bool = False  # stopped at end-of-turn (False: cut by max_new_tokens)
    settings: dict[str, Any] = field(default_factory=dict)
    judgements: dict[str, bool] = field(default_factory=dict)  # judge name -> refused (filled by evaluation)
    token_ids: list[int] = field(default_factory=list, repr=False)  # kept in memory for teacher forcing

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_ids")
        return out


def end_of_turn_ids(
    tokenizer: Any, formatter: ChatFormatter | None = None, model: nn.Module | None = None
) -> list[int]:
    """Token ids that end the assistant's turn: eos ids of the tokenizer and model, and the template's end token.

    The template's end token is the first post-instruction token when it is a special token (Llama-3
    ``<|eot_id|>``, ChatML ``<|im_end|>``, Gemma ``<end_of_turn>``), since the same token closes a reply.
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(getattr(tokenizer, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    if gen_cfg is not None:
        add(gen_cfg.eos_token_id)
    if formatter is not None and formatter.eoi_ids:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if formatter.eoi_ids[0] in special and formatter.eoi_ids[0] != tokenizer.pad_token_id:
            add(formatter.eoi_ids[0])
    if not ids:
        raise UserError("the tokenizer has no eos token and the chat template no end token; set eos_token.")
    return ids


def _instructions(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]


def cut_at_stop(row: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The reply up to (and including) its first end-of-turn token; whether one was found."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1], True
    return row, False


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    context: ContextFactory | None = None,
    settings: GenerationSettings | None = None,
    *,
    formatter: ChatFormatter | None = None,
    intervention: str = "none",
    prompt_set: str | None = None,
    progress: bool = True,
    journal: CompletionJournal | None = None,
    stop_when: Callable[[str], bool] | None = None,
) -> list[Completion]:
    """Generate one reply per prompt inside ``context()`` (a fresh context per batch).

    With a ``journal`` every finished batch is appended to it, and batches it already holds are replayed
    instead of generated (a resumed evaluation; the same batches and seeds give the same replies).
    ``stop_when(text)``: a reply whose text so far makes it true is cut there (for a judge whose verdict can no
    longer change, such as the substring refusal judge); its record says it did not finish.

    Example:
        >>> out = generate(model, tok, ["Tell me a joke"], lambda: ablate_direction(model, r))  # doctest: +SKIP
        >>> out[0].completion                                                              # doctest: +SKIP
    """
    settings = settings or GenerationSettings()
    if settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise UserError("max_new_tokens and batch_size must be at least 1.")
    items = _instructions(prompts)
    if not items:
        raise UserError(f"the {prompt_set or 'prompt'} list is empty; give at least one instruction.")
    fmt = formatter or ChatFormatter(tokenizer)
    stops = end_of_turn_ids(tokenizer, fmt, model)
    device = input_device(model)
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    out: list[Completion] = []
    starts = range(0, len(items), settings.batch_size)
    desc = f"generate {intervention}" + (f"/{prompt_set}" if prompt_set else "")
    for b, start in enumerate(progress_bar(starts, desc=desc, disable=not progress, leave=False)):
        chunk = items[start : start + settings.batch_size]
        done = journal.get(intervention, prompt_set, b, len(chunk)) if journal is not None else None
        if done is not None:
            out.extend(Completion(**row) for row in done)
            continue
        batch = fmt.encode([p.instruction for p in chunk], device)
        # generate() derives position ids from the attention mask itself; passing ours would break caching.
        inputs = {k: v for k, v in batch.items() if k != "position_ids"}
        # Seed every batch from (seed, batch index) and leave the caller's RNG state untouched.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(settings.seed * 1_000_003 + b)
            with context() if context is not None else nullcontext():
                gen = model.generate(
                    **inputs,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=_text_stop(tokenizer, stop_when, inputs["input_ids"].shape[1]),
                    **sampling,
                )
        new = gen[:, inputs["input_ids"].shape[1] :].tolist()
        made = []
        for p, row in zip(chunk, new):
            ids, finished = cut_at_stop(row, set(stops))
            ids = _cut_when(tokenizer, stop_when, ids) if stop_when is not None and not finished else ids
            made.append(completion_record(p, ids, finished, stops, tokenizer, settings, intervention, prompt_set))
        if journal is not None:
            journal.add(intervention, prompt_set, b, [asdict(c) for c in made])
        out.extend(made)
    return out


def _text_stop(tokenizer: Any, stop_when: Callable[[str], bool] | None, start: int) -> StoppingCriteriaList | None:
    """A stopping criterion that ends each row whose new tokens' text satisfies ``stop_when``."""
    if stop_when is None:
        return None

    class TextStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([stop_when(t) for t in texts], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([TextStop()])


def _cut_when(tokenizer: Any, stop_when: Callable[[str], bool], ids: list[int]) -> list[int]:
    """``ids`` up to the first token whose text so far satisfies ``stop_when`` (a stopped row is padded after);
    ``stop_when`` holds for every longer text once it holds, so a bisection finds that token."""
    if not stop_when(tokenizer.decode(ids, skip_special_tokens=True)):
        return ids
    low, high = 1, len(ids)  # the shortest satisfying prefix length is in [low, high]
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if stop_when(tokenizer.decode(ids[:mid], skip_special_tokens=True)) else (mid + 1, high)
    return ids[:high]


def completion_record(
    prompt: Prompt,
    ids: list[int],
    finished: bool,
    stops: Sequence[int],
    tokenizer: Any,
    settings: GenerationSettings,
    intervention: str,
    prompt_set: str | None,
) -> Completion:
    """The :class:`Completion` for generated token ids (end-of-turn ids kept in ``token_ids``, not in the text)."""
    text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
    return Completion(
        prompt=prompt.instruction,
        completion=text,
        category=prompt.category,
        intervention=intervention,
        prompt_set=prompt_set,
        n_tokens=len(ids),
        finished=finished,
        settings=settings.to_json(),
        token_ids=ids,
    )


def save_completions(path: str | os.PathLike, completions: Sequence[Completion]) -> None:
    """Write completions as JSON Lines (one object per reply), atomically."""
    lines = [json.dumps(c.to_json(), ensure_ascii=False) for c in completions]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def load_completions(path: str | os.PathLike) -> list[Completion]:
    """Read a completions JSONL file written by :func:`save_completions`."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise UserError(f"completions file {path} does not exist; run `refusal-lens evaluate` first.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"completions file {path} is not valid JSON Lines ({exc}); re-create it.") from None
    known = set(Completion.__dataclass_fields__)
    return [Completion(**{k: v for k, v in r.items() if k in known}) for r in rows]
