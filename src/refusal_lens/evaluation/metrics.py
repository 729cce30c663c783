"""Evaluation metrics: refusal rates with Wilson intervals, judge agreement, KL vs baseline and CE loss.

* Rates: ``k/n`` with the Wilson score 95 % interval (well-behaved at 0 and 1, unlike the normal one).
* First-token KL: KL(baseline ‖ intervened) of the next-token distribution at the last prompt position.
* Reply KL: the same KL at every position of the *baseline's own reply*, teacher-forced (both runs read the
  same tokens), averaged over reply tokens; it sees changes that only show up after the first token.
* CE loss: mean next-token negative log-likelihood (nats/token), computed in float64 from the logits, on
  plain text (no template, every token after the first), on chat data (reply tokens only, end-of-turn
  included) and on the model's own baseline replies.

Example:
    >>> wilson_interval(0, 10)
    (0.0, 0.2775327998628892)
    >>> rate_summary([True, False, True, True])["rate"]
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from itertools import combinations
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from ..direction.scoring import kl_divergence, last_logits

ContextFactory = Callable[[], AbstractContextManager]
Row = tuple[list[int], int]  # token ids, index of the first token whose prediction counts
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------------------------ rates
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (``(nan, nan)`` when ``n == 0``)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n the bounds are exactly 0 and 1; rounding would give 1e-17 / 0.9999999999999999.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def rate_summary(flags: Sequence[bool]) -> dict[str, Any]:
    """``{"rate", "k", "n", "ci95": [lo, hi]}`` for a list of yes/no judgements."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else math.nan, "k": k, "n": n, "ci95": [lo, hi]}


def by_category(flags: Sequence[bool], categories: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """:func:`rate_summary` per category (sorted by name); empty when no prompt carries a category."""
    if all(c is None for c in categories):
        return {}
    groups: dict[str, list[bool]] = {}
    for f, c in zip(flags, categories):
        groups.setdefault("(none)" if c is None else str(c), []).append(bool(f))
    return {c: rate_summary(groups[c]) for c in sorted(groups)}


def agreement(judgements: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """Fraction of items on which each pair of judges agrees (``"a|b"``), plus ``"all"`` (every judge agrees).

    Example:
        >>> agreement({"a": [True, False], "b": [True, True]})
        {'a|b': 0.5, 'all': 0.5}
    """
    names = list(judgements)
    out: dict[str, float] = {}
    if len(names) < 2:
        return out
    n = len(judgements[names[0]])
    for a, b in combinations(names, 2):
        same = sum(x == y for x, y in zip(judgements[a], judgements[b]))
        out[f"{a}|{b}"] = same / n if n else math.nan
    unanimous = sum(len({judgements[j][i] for j in names}) == 1 for i in range(n))
    out["all"] = unanimous / n if n else math.nan
    return out


# ------------------------------------------------------------------------------------------ forward passes
def _pad_left(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def _target_logits(
    model: nn.Module, rows: Sequence[Row], context: ContextFactory | None, batch_size: int, pad_id: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each row: (row index, float64 logits predicting the counted tokens ``[n, vocab]``, those tokens)."""
    device = input_device(model)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        batch = _pad_left([r for r, _ in chunk], pad_id, device)
        with torch.no_grad(), context() if context is not None else nullcontext():
            logits = model(**batch, use_cache=False).logits
        width = batch["input_ids"].shape[1]
        for i, (ids, start) in enumerate(chunk):
            offset = width - len(ids)
            # Token j is predicted at position j-1; only the counted slice is converted to float64.
            sl = logits[i, offset + start - 1 : width - 1].double()
            yield s + i, sl, torch.tensor(ids[start:], device=sl.device)


def _check_rows(rows: Sequence[Row], what: str) -> None:
    if not rows:
        raise UserError(f"no {what} to compute a loss on; give a non-empty set.")
    for ids, start in rows:
        if not 1 <= start < len(ids):
            raise ValueError(f"bad row: start {start} for {len(ids)} tokens")


def sequence_nll(
    model: nn.Module,
    rows: Sequence[Row],
    context: ContextFactory | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
) -> tuple[float, int]:
    """Summed float64 negative log-likelihood of the counted tokens of ``rows``, and how many were counted."""
    _check_rows(rows, "sequences")
    total, count = 0.0, 0
    for _, logits, targets in _target_logits(model, rows, context, batch_size, pad_id):
        logp = torch.log_softmax(logits, -1)
        total -= float(logp.gather(-1, targets[:, None]).sum())
        count += len(targets)
    return total, count


def ce_loss(
    model: nn.Module, rows: Sequence[Row], context: ContextFactory | None = None, batch_size: int = 8, pad_id: int = 0
) -> float:
    """Mean cross-entropy (nats per counted token) of ``rows`` under ``context``."""
    total, count = sequence_nll(model, rows, context, batch_size, pad_id)
    return total / count


# ------------------------------------------------------------------------------------------------ rows
def plain_text_rows(tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> list[Row]:
    """Pretraining-style rows: the text alone (BOS first when the tokenizer has one), loss on every later token."""
    rows = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if bos is not None:
            ids = [bos, *ids]
        ids = ids[:max_length]
        if len(ids) >= 2:
            rows.append((ids, 1))
    return rows


def chat_rows(formatter: ChatFormatter, pairs: Sequence[tuple[str, str]], max_length: int = 512) -> list[Row]:
    """Instruction rows: the templated prompt plus the reply; loss on the reply tokens only (end token included).

    The full conversation is rendered with the template so the reply ends the way the template closes a
    turn; when the rendering does not start with the prompt rendering (some templates rewrite history), the
    reply is tokenized alone and the eos token appended.
    """
    tok = formatter.tokenizer
    rows = []
    for instruction, reply in pairs:
        prompt_ids = formatter.token_ids(instruction)
        msgs = formatter.messages(instruction) + [{"role": "assistant", "content": reply}]
        try:
            full_text = tok.apply_chat_template(msgs, chat_template=formatter.template, tokenize=False)
            full = tok(full_text, add_special_tokens=False)["input_ids"]
        except Exception:
            full = []
        if full[: len(prompt_ids)] != prompt_ids or len(full) <= len(prompt_ids):
            full = prompt_ids + tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        full = full[:max_length]
        if len(full) > len(prompt_ids):
            rows.append((full, len(prompt_ids)))
    return rows


def completion_rows(formatter: ChatFormatter, completions: Sequence[Any]) -> list[Row]:
    """Rows from generated completions (their exact token ids, end-of-turn included when generated)."""
    tok = formatter.tokenizer
    rows = []
    for c in completions:
        prompt_ids = formatter.token_ids(c.prompt)
        reply = list(c.token_ids) or tok(c.completion, add_special_tokens=False)["input_ids"]
        if reply:
            rows.append((prompt_ids + reply, len(prompt_ids)))
    return rows


# ------------------------------------------------------------------------------------------------ KL
def first_token_kl(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    context: ContextFactory,
    batch_size: int = 32,
    baseline: torch.Tensor | None = None,
) -> list[float]:
    """Per-prompt KL(baseline ‖ intervened) at the first reply position (``baseline``: precomputed logits)."""
    base = baseline if baseline is not None else last_logits(model, formatter, list(prompts), batch_size)
    other = last_logits(model, formatter, list(prompts), batch_size, lambda rows: context())
    return kl_divergence(base, other).tolist()


def reply_kl(
    model: nn.Module, rows: Sequence[Row], context: ContextFactory, batch_size: int = 8, pad_id: int = 0
) -> dict[str, float]:
    """KL(baseline ‖ intervened) over the counted tokens of ``rows`` (the baseline's replies), teacher-forced.

    Returns the token-weighted mean (``"mean"``), the mean of per-reply means (``"mean_per_reply"``) and the
    largest per-token value (``"max"``).
    """
    _check_rows(rows, "replies")
    total, count, per_reply, biggest = 0.0, 0, [], 0.0
    # One batch at a time, baseline then intervened, so only one batch of float64 distributions is alive.
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        base = [torch.log_softmax(lg, -1) for _, lg, _ in _target_logits(model, chunk, None, batch_size, pad_id)]
        for (_, lg, _), p in zip(_target_logits(model, chunk, context, batch_size, pad_id), base):
            q = torch.log_softmax(lg, -1)
            kl = (p.exp() * (p - q)).sum(-1)
            total += float(kl.sum())
            count += len(kl)
            per_reply.append(float(kl.mean()))
            biggest = max(biggest, float(kl.max()))
    return {"mean": total / count, "mean_per_reply": sum(per_reply) / len(per_reply), "max": biggest}
