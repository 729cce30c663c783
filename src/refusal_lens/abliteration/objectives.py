"""The two objectives of the abliteration search, measured cheaply, and their check by generation.

* refusal: the first-token stand-in for "the model refuses": the mean probability of the refusal tokens at the
  first reply position over harmful prompts (the expected fraction of replies that start like a refusal);
* KL: batch-mean KL(original ‖ edited) of the first-token distributions on harmless prompts.

Both need one forward pass per batch with only the last position's logits. Prompts are sorted by length
before batching, so little compute goes to padding. Where the family allows it (``FamilySpec.exact_tail``) the
original residual stream entering every layer is kept from the first pass, and a plan whose first edited layer is
``l`` runs only layers ``l..L-1`` from it: the layers before ``l`` compute exactly what they computed before.
:func:`generated_refusals` checks a point the expensive way (greedy replies, substring judge), for the final
front only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..core.adapters import get_adapter
from ..core.hooks import site_hooks
from ..core.models import cache_argument, input_device
from ..core.prompts import ChatFormatter, position_ids
from ..direction.scoring import is_refusal_text
from ..direction.selection_passes import PromptSet, reproduces
from ..direction.strengths import AblationPlan, edited_weights
from ..evaluation.generation import GenerationSettings, generate
from .prefix import SharedPrefix

PREFIX_MIN_TOKENS = 8
"""Shortest shared prompt opening worth its own batch-1 pass per point (the organism's bare template has 3)."""


def _length_sorted(fmt: ChatFormatter, prompts: Sequence[str], batch_size: int) -> list[list[str]]:
    ordered = sorted(prompts, key=lambda p: len(fmt.token_ids(p)))
    return [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]


@dataclass
class Scores:
    refusal: float  # mean first-token refusal probability on harmful prompts (0..1)
    refusal_argmax: float  # fraction of harmful prompts whose most likely first token is a refusal token
    kl: float  # mean first-token KL(original ‖ edited) on harmless prompts

    def to_json(self) -> dict[str, float]:
        return {"refusal": self.refusal, "refusal_argmax": self.refusal_argmax, "kl": self.kl}


class Evaluator:
    """Scores an :class:`AblationPlan` by editing the weights in place (restored after each call)."""

    def __init__(
        self,
        model: nn.Module,
        formatter: ChatFormatter,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int = 32,
        norm_preserving: bool = False,
        force: bool = False,
        cache_bytes: int = 1 << 30,
        shared_prefix: bool = True,
        tail_cache: bool = True,
    ):
        self.model, self.formatter = model, formatter
        self.adapter = get_adapter(model)
        self.ids = list(refusal_ids)
        self.norm_preserving, self.force = norm_preserving, force
        device = input_device(model)
        parts = _length_sorted(formatter, harmful, batch_size), _length_sorted(formatter, harmless, batch_size)
        self.prefix: SharedPrefix | None = None
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # the unedited model's, per layer
        self.prefix_resid: list[torch.Tensor] = []  # the unedited opening's resid_pre, per layer (tail shortcut)
        self.resid: dict[int, list[torch.Tensor]] | None = None
        self.harmful, self.harmless = ([formatter.encode(b, device) for b in part] for part in parts)
        self.base_logp = torch.log_softmax(self._logits(self.harmless).double(), -1)
        base_logq = self._use_prefix(parts) if shared_prefix else None  # the harmless pass the scores will run
        tokens = sum(b["input_ids"].numel() for b in self.harmful + self.harmless)
        size = tokens * self.adapter.n_layers * self.adapter.d_model * next(model.parameters()).element_size()
        if tail_cache and self.adapter.spec.exact_tail and size <= cache_bytes:
            self.resid = self._capture(self.harmful + self.harmless)
        self.base = self._scores(self._logits(self.harmful), self.base_logp if base_logq is None else base_logq)
        self.calls = 0

    def _use_prefix(self, parts: tuple[list[list[str]], ...]) -> torch.Tensor | None:
        """Switch to prefix + rest batches (``parts``: the harmful and harmless prompts' batches) if the prompts
        share an opening worth it and the batches give the unedited model's logits (else keep whole prompts).
        Returns the harmless first-token log-probabilities the prefix batches gave (None: whole prompts kept)."""
        prompts = [p for part in parts for b in part for p in b]
        shared = PromptSet(self.formatter, prompts, input_device(self.model))  # the selection's shared-prefix length
        if shared.prefix < PREFIX_MIN_TOKENS:  # the extra batch-1 pass per point would cost more than it saves
            return None
        prefix = SharedPrefix(shared.ids[0][: shared.prefix], shared.device)
        pad = getattr(self.formatter.tokenizer, "pad_token_id", None) or 0
        whole = self.harmful, self.harmless, self.prefix, self.prefix_kv
        try:
            self.prefix, self.prefix_kv = prefix, prefix.keys_values(self.model, self.adapter.n_layers)
            rows = [[[self.formatter.token_ids(p) for p in b] for b in part] for part in parts]
            self.harmful, self.harmless = ([prefix.batch(b, pad) for b in part] for part in rows)
            got = torch.log_softmax(self._logits(self.harmless).double(), -1)
            if reproduces(got, self.base_logp, self.adapter.embed.weight.dtype):
                return got
            why = "does not reproduce the model's first-token distributions"
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
            why = f"failed ({type(exc).__name__}: {exc})"  # a family whose forward takes no cache this way
        warnings.warn(f"running the prompts' shared opening once per point {why}; scoring whole prompts (slower, "
                      "same result).", stacklevel=3)  # fmt: skip
        self.harmful, self.harmless, self.prefix, self.prefix_kv = whole
        return None

    @torch.no_grad()
    def _capture(self, batches: list[dict]) -> dict[int, list[torch.Tensor]]:
        """The original ``resid_pre`` of every layer for every batch (keyed by the batch's id)."""
        out: dict[int, list[torch.Tensor]] = {}
        current: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            return lambda x: current.__setitem__(layer, x.detach().clone())

        fns = {(layer, "resid_pre"): keep(layer) for layer in range(self.adapter.n_layers)}
        with site_hooks(self.model, fns, self.adapter):
            if self.prefix is not None:
                self.model(input_ids=self.prefix.ids, use_cache=False, logits_to_keep=1)
                self.prefix_resid = [current[layer] for layer in range(self.adapter.n_layers)]
            for b in batches:
                self.model(**b, **self.cache_args(self.prefix_kv, b), logits_to_keep=1)
                out[id(b)] = [current[layer] for layer in range(self.adapter.n_layers)]
        return out

    def cache_args(self, kv: list, batch: dict) -> dict:
        """Keyword arguments that continue ``batch`` from the opening's keys and values ``kv`` (or run it whole)."""
        if self.prefix is None:
            return {"use_cache": False}
        cache = SharedPrefix.cache(self.model, kv, batch["input_ids"].shape[0])
        return {cache_argument(self.model): cache, "use_cache": True}

    def _prefix_keys_values(self, first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values under the current weights; layers before ``first`` are unedited."""
        if self.prefix is None:
            return []
        if first == 0 or self.resid is None:
            return self.prefix.keys_values(self.model, self.adapter.n_layers)
        positions = position_ids(torch.ones_like(self.prefix.ids))
        start = {"inputs_embeds": self.prefix_resid[first], "position_ids": positions}
        cache = DynamicCache(config=self.model.config)  # made before the layer list is cut: it needs every layer
        with self.adapter.tail_layers(first):
            kv = self.prefix.keys_values(self.model, self.adapter.n_layers, start, cache)
        return self.prefix_kv[:first] + kv[first:]

    @torch.no_grad()
    def _logits(self, batches: list[dict], first: int = 0) -> torch.Tensor:
        out = []
        kv = self._prefix_keys_values(first)
        for b in batches:
            cache = self.cache_args(kv, b)  # made before the layer list is cut: it needs every layer's type
            if first > 0 and self.resid is not None:
                tail = {"inputs_embeds": self.resid[id(b)][first], "attention_mask": b["attention_mask"],
                        "position_ids": b["position_ids"]}  # fmt: skip
                with self.adapter.tail_layers(first):
                    logits = self.model(**tail, **cache, logits_to_keep=1).logits
            else:
                logits = self.model(**b, **cache, logits_to_keep=1).logits
            out.append(logits[:, -1].float().cpu())
        return torch.cat(out)

    def _score_current(self, first: int = 0) -> Scores:
        harmful = self._logits(self.harmful, first)
        return self._scores(harmful, torch.log_softmax(self._logits(self.harmless, first).double(), -1))

    def _scores(self, harmful_logits: torch.Tensor, harmless_logq: torch.Tensor) -> Scores:
        probs = torch.softmax(harmful_logits.double(), -1)
        refusal = probs[:, self.ids].sum(-1)
        argmax_refuses = torch.isin(probs.argmax(-1), torch.tensor(self.ids))
        kl = (self.base_logp.exp() * (self.base_logp - harmless_logq)).sum(-1).clamp_min(0)
        return Scores(float(refusal.mean()), float(argmax_refuses.double().mean()), float(kl.mean()))

    def __call__(self, plan: AblationPlan) -> Scores:
        self.calls += 1
        layers = [0 if layer is None else layer for _, layer, _, _ in plan.sites()]
        first = min(layers, default=0)  # layers before the first edit compute what they did originally
        with edited_weights(self.model, plan, self.norm_preserving, self.force):
            return self._score_current(first)


def generated_refusals(
    model: nn.Module,
    tokenizer: object,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    plan: AblationPlan | None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    norm_preserving: bool = False,
    force: bool = False,
) -> tuple[int, list[str]]:
    """Greedy replies to ``prompts`` with the plan's weights; (number judged refusals, the replies).

    A reply stops as soon as it contains a refusal phrase: the substring judge's verdict cannot change after that,
    so the count is the one full replies give, and a model that still refuses most prompts is checked quickly.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def run() -> list[str]:
        out = generate(model, tokenizer, list(prompts), settings=settings, formatter=formatter, progress=False,
                       stop_when=is_refusal_text)  # fmt: skip
        return [c.completion for c in out]

    if plan is None:
        replies = run()
    else:
        with edited_weights(model, plan, norm_preserving, force):
            replies = run()
    return sum(is_refusal_text(r) for r in replies), replies
