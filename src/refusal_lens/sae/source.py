"""The model-backed activation stream: documents -> tokens -> activations at one site.

:class:`ActivationSource` runs a HF model over documents - chat conversations rendered with the
tokenizer's own chat template, plain text, or a mix at a fixed ratio - and reads one site through the
architecture adapter (never a hard-coded module path). BOS and padding are always dropped; special
tokens, all chat-template tokens and high-norm outliers (attention sinks) optionally. Activations are
collected into chunks of ``buffer_tokens`` that are shuffled as a whole, so a batch mixes many
documents. A chunk is a pure function of (seed, first document index), so the stream position is just
(chunk start, batches served) and a resumed run sees exactly the batches an uninterrupted one would.
Streams that need no model (tensors, caches) are in :mod:`refusal_lens.sae.streams`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config_args import at_least
from ..core.errors import UserError
from ..core.io import read_text_file

Chat = list[dict[str, str]]
Doc = tuple[str, Any]  # ("text", str) or ("chat", [{"role", "content"}, ...])


@dataclass
class DataConfig:
    """Which documents to read and how to turn them into activations (fields double as CLI help)."""

    data: str = field(
        default="chat",
        metadata={"help": "chat (templated conversations), text (plain text) or mix:R (fraction R chat)"},
    )
    data_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON/JSONL of {'text'}, {'messages'} or {'instruction','reply'} records "
            "(required with --model; the organism defaults to its own corpus)"
        },
    )
    context_size: int = field(
        default=128, metadata={**at_least(2), "help": "tokens per document (longer ones are cut)"}
    )
    model_batch_size: int = field(default=16, metadata={**at_least(1), "help": "documents per model forward pass"})
    buffer_tokens: int = field(
        default=65_536, metadata={**at_least(1), "help": "tokens collected and shuffled together before batching"}
    )
    exclude_special: bool = field(
        default=False, metadata={"help": "drop special tokens such as <|im_start|> (BOS and padding always are)"}
    )
    exclude_template: bool = field(
        default=False,
        metadata={
            "help": "keep only tokens inside message contents (drops all chat-template tokens; "
            "note that the refusal direction lives on template tokens)"
        },
    )
    outlier_factor: float = field(
        default=10.0,
        metadata={
            **at_least(0),
            "help": "drop tokens whose norm exceeds this multiple of the batch median (0: keep all)",
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt placed before each chat document", "flag": "system"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the document order and buffer shuffles"})

    def chat_fraction(self) -> float:
        if self.data == "chat":
            return 1.0
        if self.data == "text":
            return 0.0
        if self.data.startswith("mix:"):
            try:
                r = float(self.data[4:])
            except ValueError:
                r = -1.0
            if 0.0 <= r <= 1.0:
                return r
        raise UserError(f"--data {self.data!r} is not understood; use chat, text or mix:R with 0 <= R <= 1.")


# ---------------------------------------------------------------------------------------------- documents
def _as_chat(record: dict[str, Any], where: str) -> Chat:
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise UserError(f"{where}: 'messages' must be a list of {{'role', 'content'}}; fix the record.")
        return [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in msgs]
    chat = [{"role": "user", "content": str(record["instruction"])}]
    if record.get("reply") is not None:
        chat.append({"role": "assistant", "content": str(record["reply"])})
    return chat


def load_data_file(path: str | Path) -> tuple[list[str], list[Chat]]:
    """Read plain-text and chat documents from a JSON array or JSON-lines file."""
    p = Path(path)
    text = read_text_file(p, "--data-file")
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as exc:
        raise UserError(f"--data-file {p} is not valid JSON or JSON lines ({exc}); fix the file.") from None
    texts: list[str] = []
    chats: list[Chat] = []
    for i, r in enumerate(records):
        where = f"--data-file {p} record {i + 1}"
        if isinstance(r, str):
            texts.append(r)
        elif isinstance(r, dict) and "text" in r:
            texts.append(str(r["text"]))
        elif isinstance(r, dict) and ("messages" in r or "instruction" in r):
            chats.append(_as_chat(r, where))
        else:
            raise UserError(f"{where} has none of 'text', 'messages', 'instruction'; fix the record.")
    return texts, chats


def _organism_corpus() -> tuple[list[str], list[Chat]]:
    try:
        from ..organism import corpus
    except ImportError:  # the organism corpus is optional
        raise UserError("no --data-file given and the built-in corpus is unavailable; pass --data-file.") from None
    chats = [_as_chat(c, "organism corpus") for c in corpus.chat_pairs()]
    return corpus.plain_text(), chats


#: Where documents come from when no ``--data-file`` is given. Replace to plug in another corpus.
default_corpus: Callable[[], tuple[list[str], list[Chat]]] = _organism_corpus


class DocumentOrder:
    """Deterministic infinite sequence of documents mixing chat and text at a fixed ratio.

    Document i is chat when floor((i+1) R) > floor(i R), so any prefix holds the ratio to within one
    document; each kind is walked through a fresh seeded permutation per epoch.
    """

    def __init__(self, texts: Sequence[str], chats: Sequence[Chat], chat_fraction: float, seed: int):
        if chat_fraction > 0 and not chats:
            raise UserError("--data asks for chat documents but the data has none; use --data text or add some.")
        if chat_fraction < 1 and not texts:
            raise UserError("--data asks for plain text but the data has none; use --data chat or add some.")
        self.texts, self.chats, self.r, self.seed = list(texts), list(chats), chat_fraction, seed
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _nth(self, kind: int, j: int) -> Any:
        pool = self.chats if kind else self.texts
        epoch, idx = divmod(j, len(pool))
        key = (kind, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * epoch + kind)
            self._perms[key] = torch.randperm(len(pool), generator=g).tolist()
            if len(self._perms) > 8:  # keep memory bounded on long runs
                self._perms.pop(next(iter(self._perms)))
        return pool[self._perms[key][idx]]

    def __getitem__(self, i: int) -> Doc:
        n_chat_before = math.floor(i * self.r)
        if math.floor((i + 1) * self.r) > n_chat_before:
            return "chat", self._nth(1, n_chat_before)
        return "text", self._nth(0, i - n_chat_before)


# ---------------------------------------------------------------------------------------------- tokens
def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special or template token the tokenizer knows."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


def render(tokenizer: Any, doc: Doc, system_prompt: str | None = None) -> tuple[str, list[str]]:
    """The text of a document and its content strings (messages; the whole text for plain documents)."""
    kind, content = doc
    if kind == "text":
        return content, [content]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template, so chat data cannot be formatted; use --data text.")
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + list(content)
    return tokenizer.apply_chat_template(msgs, tokenize=False), [m["content"] for m in msgs]


def _content_mask(text: str, contents: list[str], offsets: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose characters overlap a message's content (False: chat-template tokens)."""
    spans, pos = [], 0
    for c in contents:
        start = text.find(c, pos) if c else -1
        if start >= 0:
            spans.append((start, start + len(c)))
            pos = start + len(c)
    return [any(a < e and b > s for s, e in spans) for a, b in offsets]


def tokenize_docs(
    tokenizer: Any, docs: Sequence[Doc], cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and the mask of tokens SAEs see.

    Every document starts with BOS when the tokenizer has one (chat templates write it themselves; plain
    text gets it prepended), so position 0 is the same attention sink in both kinds and is dropped.
    """
    rows, content_rows = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    for doc in docs:
        text, contents = render(tokenizer, doc, cfg.system_prompt)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=cfg.exclude_template)
        ids = list(enc["input_ids"])
        in_content = _content_mask(text, contents, enc["offset_mapping"]) if cfg.exclude_template else [True] * len(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids, in_content = [bos, *ids], [False, *in_content]
        rows.append(ids[: cfg.context_size] or [tokenizer.pad_token_id])
        content_rows.append(in_content[: cfg.context_size] or [False])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Right padding keeps real tokens at their natural positions (left padding shifts RoPE positions).
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, c) in enumerate(zip(rows, content_rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        keep[i, : len(r)] = torch.tensor(c)
    if bos is not None:
        keep &= input_ids != bos
    if cfg.exclude_special:
        for sid in special_token_ids(tokenizer):
            keep &= input_ids != sid
    return input_ids, attention, keep


class _Stop(Exception):
    """Raised from the hook once the site is read, so layers above it are not computed."""


def read_site(
    model: nn.Module, layer: int, site: str, input_ids: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """Activations ``[batch, seq, d_model]`` at one site (the forward stops right after it)."""
    from ..core.hooks import site_hooks

    seen: dict[str, torch.Tensor] = {}

    def grab(x: torch.Tensor) -> None:
        seen["x"] = x.detach()
        raise _Stop

    device = model.get_input_embeddings().weight.device
    with torch.no_grad(), site_hooks(model, {(layer, site): grab}):
        try:
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        except _Stop:
            pass
    if "x" not in seen:
        raise UserError(f"site {site} of layer {layer} was never reached in the forward pass; check --layer.")
    return seen["x"]


def drop_outliers(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """Boolean mask of rows of ``acts [n, d]`` whose norm is at most ``factor`` x the median norm."""
    if factor <= 0 or acts.shape[0] == 0:
        return torch.ones(acts.shape[0], dtype=torch.bool)
    norms = acts.norm(dim=-1)
    return norms <= factor * norms.median()


# ---------------------------------------------------------------------------------------------- streams
class ActivationSource:
    """Streams activations of ``model`` at ``(layer, site)`` over documents (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int,
        site: str,
        cfg: DataConfig,
        batch_size: int,
        texts: Sequence[str] | None = None,
        chats: Sequence[Chat] | None = None,
    ):
        from ..core.adapters import get_adapter

        if texts is None and chats is None:
            texts, chats = load_data_file(cfg.data_file) if cfg.data_file else default_corpus()
        self.model, self.tokenizer, self.layer, self.site, self.cfg = model, tokenizer, layer, site, cfg
        self.adapter = get_adapter(model)
        self.adapter.site_module(layer, site)  # validates layer and site now, not mid-training
        self.d_in = self.adapter.d_model
        self.batch_size = batch_size
        self.texts, self.chats = list(texts or []), list(chats or [])
        self.order = DocumentOrder(self.texts, self.chats, cfg.chat_fraction(), cfg.seed)
        self.buffer_tokens = max(cfg.buffer_tokens, batch_size)
        self._chunk: torch.Tensor | None = None
        self._chunk_start = 0
        self._next_doc = 0
        self._served = 0

    # -- metadata for the saved SAE
    def describe(self) -> dict[str, Any]:
        return {
            "hook_name": self.adapter.hook_name(self.layer, self.site),
            "hf_module_path": self.adapter.module_path(self.layer, self.site),
            "site": self.site,
            "layer": self.layer,
            "data_mix": self.cfg.data,
            "chat_fraction": self.cfg.chat_fraction(),
            "dataset_path": self.cfg.data_file or "refusal_lens.organism.corpus",
            "context_size": self.cfg.context_size,
            "prepend_bos": getattr(self.tokenizer, "bos_token_id", None) is not None,
            "chat_template": getattr(self.tokenizer, "chat_template", None),
            "exclude_special": self.cfg.exclude_special,
            "exclude_template": self.cfg.exclude_template,
            "outlier_factor": self.cfg.outlier_factor,
        }

    def activations_for(self, docs: Sequence[Doc]) -> torch.Tensor:
        """Kept activations ``[n, d]`` (float32, CPU) of a list of documents."""
        input_ids, attention, keep = tokenize_docs(self.tokenizer, docs, self.cfg)
        acts = read_site(self.model, self.layer, self.site, input_ids, attention)
        acts = acts[keep.to(acts.device)].float().cpu()
        if not torch.isfinite(acts).all():
            raise UserError(
                f"the model produced NaN/inf activations at {self.site} of layer {self.layer}; "
                "load it in float32 (--dtype float32)."
            )
        return acts[drop_outliers(acts, self.cfg.outlier_factor)]

    def _fill(self, start: int) -> None:
        parts, n, pos = [], 0, start
        n_docs = max(1, len(self.texts) + len(self.chats))
        while n < self.buffer_tokens:
            docs = [self.order[i] for i in range(pos, pos + self.cfg.model_batch_size)]
            pos += len(docs)
            a = self.activations_for(docs)
            parts.append(a)
            n += a.shape[0]
            if n == 0 and pos - start > n_docs:
                raise UserError("no usable tokens in the data (all BOS/special/padding); check --data-file.")
        chunk = torch.cat(parts)
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + start)
        self._chunk = chunk[torch.randperm(chunk.shape[0], generator=g)]
        self._chunk_start, self._next_doc, self._served = start, pos, 0

    def next_batch(self) -> torch.Tensor:
        b = self.batch_size
        if self._chunk is None or (self._served + 1) * b > self._chunk.shape[0]:
            self._fill(self._next_doc)  # the chunk's remainder (< one batch) is dropped
        assert self._chunk is not None
        batch = self._chunk[self._served * b : (self._served + 1) * b]
        self._served += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "chunk_start": self._chunk_start if self._chunk is not None else None,
            "served": self._served,
            "next_doc": self._next_doc,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("chunk_start") is None:
            self._chunk, self._next_doc, self._served = None, int(state.get("next_doc", 0)), 0
            return
        self._fill(int(state["chunk_start"]))
        self._served = int(state["served"])

    def fresh(self) -> ActivationSource:
        return ActivationSource(
            self.model,
            self.tokenizer,
            self.layer,
            self.site,
            self.cfg,
            self.batch_size,
            self.texts,
            self.chats,
        )
