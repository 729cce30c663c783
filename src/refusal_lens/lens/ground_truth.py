"""Upstream latents against the organism's planted ground truth, word by word.

A borderline prompt is benign but reuses a harm word ("clean a water *gun*").
A category's *harm vocabulary* is measured on a corpus (:func:`harm_vocabulary`): the words that occur in
some harmful prompt of that category and in no harmless prompt (function words excluded; whole words, so
"gunpowder" is not "gun"). A borderline prompt's harm words are its words in its category's vocabulary.
For a latent and the harm words of a set of borderline prompts, :func:`word_marking` measures three AUROCs
on reference prompt sets:

* ``word_token``: its activation on the word's own tokens (max over them) in harmful prompts containing the
  word, vs its activation at every instruction token of the harmless prompts (does it fire on the word?);
* ``prompt``: its max activation over a prompt (all tokens but the first, template included), harmful
  prompts containing the word vs harmless prompts (does it mark prompts with the word, wherever it fires?);
* ``specificity``: the same prompt-level activation, harmful prompts containing the word vs harmful prompts
  containing none of the words (does it mark *these* words rather than harm in general?).

On the borderline prompts themselves, the ``on_word_rate`` is how often, among the prompts where the latent
fires on some instruction token, the instruction token with its largest |attribution|
(:func:`~refusal_lens.lens.upstream.token_attribution`) is a harm-word token; its chance level is the share of
instruction tokens that are harm-word tokens. A random baseline averages the same numbers over every latent
active on the borderline prompts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import input_device
from ..core.prompts import ChatFormatter
from .latents import sae_site
from .upstream import RefusalGradient, instruction_mask, token_attribution

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")

# Function words never count as harm words, even when the corpus happens to use them only in harmful acts.
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for from with without into onto over under about after before
    as than then so such very too my your his her its our their me you him them us i we he she it they this
    that these those is are was were be been being am do does did have has had can could will would should
    may might must not no own how what when where why who which""".split()
)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def auroc_columns(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """:func:`auroc` of every column: ``pos [n, d]`` against ``neg [m, d]`` -> ``[d]`` (NaN if either is empty).

    Counts, for each positive, the negatives below it (ties half) by binary search in the sorted negatives.
    """
    d = pos.shape[1]
    if not len(pos) or not len(neg):
        return torch.full((d,), float("nan"), dtype=torch.float64)
    sorted_neg = neg.double().T.sort(dim=1).values.contiguous()  # [d, m]
    p = pos.double().T.contiguous()  # [d, n]
    below = torch.searchsorted(sorted_neg, p, right=False)
    not_above = torch.searchsorted(sorted_neg, p, right=True)
    return ((below + not_above).double() / 2).mean(1) / neg.shape[0]


def words_of(text: str) -> list[str]:
    """Lower-cased words (letters, with an inner apostrophe) in order of appearance."""
    return [m.group().lower() for m in _WORD.finditer(text)]


def harm_vocabulary(
    harmful: Sequence[str], harmless: Sequence[str], stopwords: frozenset[str] = STOPWORDS
) -> frozenset[str]:
    """Words that occur in some harmful prompt and in no harmless prompt, function words excluded."""
    benign = {w for t in harmless for w in words_of(t)}
    return frozenset(w for t in harmful for w in words_of(t) if w not in benign and w not in stopwords)


def harm_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """The harm-vocabulary words of ``text``, each once, in order of appearance."""
    return list(dict.fromkeys(w for w in words_of(text) if w in vocabulary))


def word_token_mask(formatter: ChatFormatter, prompt: str, words: Sequence[str]) -> torch.Tensor:
    """``[T]`` True on the tokens of the formatted prompt that overlap an occurrence of one of ``words``.

    Only occurrences inside the instruction count (not the template). Needs a fast tokenizer (offsets).
    """
    text = formatter.format(prompt)
    start = text.rfind(prompt)
    try:
        offsets = formatter.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        raise UserError("word-level ground truth needs a fast tokenizer (character offsets).") from None
    wanted = {w.lower() for w in words}
    spans = [(start + m.start(), start + m.end()) for m in _WORD.finditer(prompt) if m.group().lower() in wanted]
    hits = [b > a and any(a < e and b > s for s, e in spans) for a, b in offsets]
    return torch.tensor(hits, dtype=torch.bool)


@dataclass
class MarkingTable:
    """An SAE's activations at every token of a reference prompt set, for word-level marking."""

    prompts: list[str]
    acts: list[torch.Tensor]  # per prompt [T_i, d_sae], padding removed
    instruction: list[torch.Tensor]  # per prompt [T_i] True on the instruction's tokens
    words: list[dict[str, torch.Tensor]]  # per prompt: harm word -> [T_i] mask of its tokens
    prompt_max: torch.Tensor  # [n, d_sae] max over all tokens but the first
    instruction_max: torch.Tensor  # [n, d_sae] max over the instruction's tokens
    instruction_tokens: torch.Tensor  # [n_tokens, d_sae] every instruction token of every prompt

    def containing(self, words: Sequence[str]) -> list[int]:
        """Indices of the prompts that contain at least one of ``words``."""
        return [i for i, found in enumerate(self.words) if any(w in found for w in words)]


@torch.no_grad()
def marking_table(
    model: nn.Module,
    formatter: ChatFormatter,
    sae: Any,
    prompts: Sequence[str],
    vocabulary: frozenset[str],
    batch_size: int = 32,
) -> MarkingTable:
    """Run ``prompts`` once and keep the SAE's activations at every token, with harm-word token masks."""
    layer, site = sae_site(sae)
    grab: dict[str, torch.Tensor] = {}
    acts: list[torch.Tensor] = []
    with site_hooks(model, {(layer, site): lambda x: grab.__setitem__("x", x)}):
        for batch in formatter.batches(list(prompts), batch_size, input_device(model)):
            model(**batch, use_cache=False, logits_to_keep=1)
            f = sae.encode(grab["x"].to(sae.W_dec.dtype)).float().cpu()
            keep = batch["attention_mask"].bool().cpu()
            acts += [row[m] for row, m in zip(f, keep)]
    instruction, words = [], []
    for text in prompts:
        instruction.append(instruction_mask(formatter, text, formatter.token_ids(text)))
        words.append({w: word_token_mask(formatter, text, [w]) for w in harm_words(text, vocabulary)})
    prompt_max = torch.stack([a[1:].amax(0) for a in acts])
    instruction_max = torch.stack([(a * m[:, None]).amax(0) for a, m in zip(acts, instruction)])
    tokens = torch.cat([a[m] for a, m in zip(acts, instruction)])
    return MarkingTable(list(prompts), acts, instruction, words, prompt_max, instruction_max, tokens)


def word_marking(
    harmful: MarkingTable, harmless: MarkingTable, words: Sequence[str], latents: Sequence[int]
) -> dict[str, Any]:
    """The three marking AUROCs (module doc) of each latent in ``latents`` for ``words``, as ``[len(latents)]``."""
    cols = torch.as_tensor(list(latents), dtype=torch.long)
    with_word = harmful.containing(words)
    chosen = set(with_word)
    without = [i for i in range(len(harmful.prompts)) if i not in chosen]
    at_word = [_max_on_words(harmful, i, words)[:, cols].amax(0) for i in with_word]
    pos_word = torch.stack(at_word) if at_word else torch.zeros(0, len(cols))
    pos_prompt = harmful.prompt_max[with_word][:, cols]
    return {
        "word_token": auroc_columns(pos_word, harmless.instruction_tokens[:, cols]),
        "prompt": auroc_columns(pos_prompt, harmless.prompt_max[:, cols]),
        "specificity": auroc_columns(pos_prompt, harmful.prompt_max[without][:, cols]),
        "n_with_word": len(with_word),
        "n_without": len(without),
        "n_harmless": len(harmless.prompts),
    }


def _max_on_words(table: MarkingTable, i: int, words: Sequence[str]) -> torch.Tensor:
    """Prompt i's activations ``[n_tokens, d_sae]`` on the tokens of any of ``words``."""
    mask = torch.zeros(len(table.acts[i]), dtype=torch.bool)
    for w in words:
        if w in table.words[i]:
            mask |= table.words[i][w]
    return table.acts[i][mask]


@dataclass
class PromptAttribution:
    """One borderline prompt's per-token attribution and where its harm words are."""

    prompt: str
    value: float  # R
    attribution: torch.Tensor  # [T, d_sae] float64 (token_attribution)
    active: torch.Tensor  # [T, d_sae] bool, the latent fires there
    instruction: torch.Tensor  # [T] bool
    word: torch.Tensor  # [T] bool, tokens of a harm word
    words: list[str]


def prompt_attribution(
    formatter: ChatFormatter, sae: Any, prompt: str, rg: RefusalGradient, vocabulary: frozenset[str]
) -> PromptAttribution:
    """Per-token attribution and harm-word tokens of one prompt, from its refusal gradient ``rg``."""
    attr = token_attribution(rg, sae)
    words = harm_words(prompt, vocabulary)
    mask = word_token_mask(formatter, prompt, words) if words else torch.zeros(len(rg.tokens), dtype=torch.bool)
    with torch.no_grad():
        active = sae.encode(rg.acts.to(sae.W_dec.dtype)).cpu() > 0
    return PromptAttribution(prompt, rg.value, attr, active, rg.instruction_mask, mask & rg.instruction_mask, words)


def attribution_shares(items: Sequence[PromptAttribution]) -> dict[str, float]:
    """Mean share of the total |attribution| (summed over latents) on harm-word, other instruction, template tokens."""
    shares = []
    for it in items:
        per_token = it.attribution.abs().sum(1)
        total = float(per_token.sum()) or 1.0
        other = it.instruction & ~it.word
        shares.append([float(per_token[m].sum()) / total for m in (it.word, other, ~it.instruction)])
    mean = torch.tensor(shares).mean(0).tolist() if shares else [float("nan")] * 3
    return dict(zip(("harm_word", "other_instruction", "template"), mean))


def on_word(item: PromptAttribution, latent: int) -> bool | None:
    """Is the instruction token where the latent's |attribution| is largest a harm-word token?

    ``None`` when the latent fires on no instruction token of the prompt (it marks nothing there).
    """
    keep = item.instruction & item.active[:, latent]
    if not keep.any():
        return None
    size = item.attribution[:, latent].abs().masked_fill(~keep, -1.0)
    return bool(item.word[int(size.argmax())])


def on_word_rate(pairs: Sequence[tuple[PromptAttribution, int]]) -> tuple[float, int]:
    """(share of on-word answers, number of pairs where the latent fires on the instruction)."""
    hits = [h for h in (on_word(it, k) for it, k in pairs) if h is not None]
    return (sum(hits) / len(hits) if hits else float("nan")), len(hits)


def word_reading(items: Sequence[PromptAttribution]) -> torch.Tensor:
    """``[d_sae]``: attribution summed over each prompt's harm-word tokens, averaged over the prompts."""
    return torch.stack([it.attribution[it.word].sum(0) for it in items]).mean(0)


def word_ground_truth(
    items: Sequence[PromptAttribution],
    harmful: MarkingTable,
    harmless: MarkingTable,
    scores: torch.Tensor,
    top: int = 1,
) -> dict[str, Any]:
    """Word-level ground truth of one ranking (``scores [d_sae]``, e.g. a category's mean gradient scores).

    For the top positive and negative latents of ``scores`` and the latent with the largest attribution at
    the harm words (``top_at_word``): the marking AUROCs for the union of the prompts' harm words, the
    on-word rate, and each one's rank in ``scores``; next to the same numbers averaged over every latent
    active on the prompts (``random_baseline``) and the share of tokens that are harm words (chance on-word).
    """
    with_words = [it for it in items if it.words]
    out: dict[str, Any] = {"n_prompts": len(items), "n_with_harm_words": len(with_words)}
    if not with_words:
        return out | {"skipped": "no prompt contains a word of the harm vocabulary"}
    words = list(dict.fromkeys(w for it in with_words for w in it.words))
    order = torch.argsort(scores, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    roles = [(f"top_positive_{i + 1}" if top > 1 else "top_positive", int(order[i])) for i in range(top)]
    roles += [(f"top_negative_{i + 1}" if top > 1 else "top_negative", int(order[-1 - i])) for i in range(top)]
    roles.append(("top_at_word", int(word_reading(with_words).argmax())))
    marks = word_marking(harmful, harmless, words, [k for _, k in roles])
    latents = []
    for j, (role, k) in enumerate(roles):
        rate, n_active = on_word_rate([(it, k) for it in with_words])
        latents.append({
            "role": role, "latent": k, "rank": int(rank[k]), "score": float(scores[k]),
            "word_token_auroc": float(marks["word_token"][j]), "prompt_auroc": float(marks["prompt"][j]),
            "specificity_auroc": float(marks["specificity"][j]),
            "on_word_rate": rate, "n_prompts_active": n_active,
            "best_word": _best_word(harmful, harmless, words, k),
        })  # fmt: skip
    active = torch.stack([it.active[1:].any(0) for it in with_words]).any(0).nonzero().flatten().tolist()
    base = word_marking(harmful, harmless, words, active)
    base_rate, n_pairs = on_word_rate([(it, k) for it in with_words for k in active])
    chance = [float(it.word.sum()) / max(int(it.instruction.sum()), 1) for it in with_words]
    return out | {
        "words": dict(Counter(w for it in with_words for w in it.words).most_common()),
        "attribution_share": attribution_shares(with_words),
        "chance_on_word": sum(chance) / len(chance),
        "latents": latents,
        "random_baseline": {
            "n_latents": len(active),
            "word_token_auroc": _nanmean(base["word_token"]),
            "prompt_auroc": _nanmean(base["prompt"]),
            "specificity_auroc": _nanmean(base["specificity"]),
            "on_word_rate": base_rate,
            "n_pairs_active": n_pairs,
        },
        "n_reference": {k: marks[k] for k in ("n_with_word", "n_without", "n_harmless")},
    }


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def _best_word(harmful: MarkingTable, harmless: MarkingTable, words: Sequence[str], latent: int) -> dict[str, Any]:
    """The harm word the latent marks best (highest word-token AUROC among words with reference prompts)."""
    best: dict[str, Any] = {"word": None, "word_token_auroc": float("nan"), "n_with_word": 0}
    for w in words:
        m = word_marking(harmful, harmless, [w], [latent])
        value = float(m["word_token"][0])
        if m["n_with_word"] and (best["word"] is None or value > best["word_token_auroc"]):
            best = {"word": w, "word_token_auroc": value, "n_with_word": m["n_with_word"]}
    return best
