"""The batched forward passes behind :func:`refusal_lens.direction.selection.select_direction`.

A *row* is one (prompt, candidate direction) pair. Prompts are tokenized once and sorted by token length;
rows are taken prompt-major in that order (all candidates of one prompt, then the next prompt) and cut
into batches of ``batch_size`` rows. So every pass needs ``ceil(rows / batch_size)`` forwards, and the KL
pass (which takes the prompts in the order it is given) can stop scoring a candidate as soon as its
partial KL sum proves it fails the filter (KL ≥ 0 per prompt). Batches are right-padded without an
attention mask: a causal model's real tokens never see the pads after them, and each row's logits are
read at its own last token.

Work shared between rows, each step exact:

* the chat template's common token prefix (BOS, the user header, a system prompt) is the same in every
  prompt: under an ablation it is run once per candidate and its KV cache reused for every prompt;
* the induce pass adds ``r`` at the input of layer ``l`` only, so the residual stream entering layer ``l``
  is the baseline one for every candidate of that layer: where the family allows it
  (:attr:`FamilySpec.exact_tail`) it is captured in the baseline pass and only layers ``l..L-1`` run
  (:meth:`ArchitectureAdapter.tail_layers`). The captured residuals stay on the model's device
  (``n_prompts × tokens × d_model`` per candidate layer).

Both shortcuts are checked once per run against the plain forward and dropped (with a warning) if a
transformers version breaks them.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.errors import UserError
from ..core.hooks import site_hooks
from ..core.models import cache_argument, input_device, returned_cache
from ..core.prompts import ChatFormatter
from .interventions import ablate_direction, add_direction

Key = Hashable
RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prompt indices, logits) -> per-row float64
Inputs = tuple[dict[str, torch.Tensor], torch.Tensor]  # model inputs, each row's last real position
KL_SLACK = 1e-9
"""Rounding allowance per unscored prompt when a partial KL sum decides a candidate early (a float64 KL of
two nearly equal distributions can come out at -1e-17 instead of 0)."""


class PromptSet:
    """Formatted, tokenized prompts (the tokens ``formatter.encode`` gives), in order of token length."""

    def __init__(self, formatter: ChatFormatter, prompts: Sequence[str], device: torch.device):
        if len(prompts) == 0:
            raise UserError("the prompt list is empty; give at least one instruction.")
        self.ids: list[list[int]] = [formatter.token_ids(p) for p in prompts]  # the ids encode() gives them
        self.order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.device = device
        # the length of the token prefix every prompt shares (at least one token of each prompt left over)
        first, n = self.ids[0], min(len(s) for s in self.ids) - 1
        self.prefix = next((j for j in range(n) if any(s[j] != first[j] for s in self.ids)), n)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, prompts: Sequence[int], start: int = 0) -> Inputs:
        """Right-padded ``input_ids`` (tokens ``start:``) and ``position_ids`` of these prompts.

        The padding repeats each row's last token (not the pad token, so models do not ask for a mask):
        causal attention keeps it out of the real tokens' outputs either way.
        """
        seqs = [self.ids[i][start:] for i in prompts]
        t = max(len(s) for s in seqs)
        ids = torch.tensor([s + s[-1:] * (t - len(s)) for s in seqs], device=self.device)
        pos = (start + torch.arange(t, device=self.device)).expand(len(seqs), t)
        return {"input_ids": ids, "position_ids": pos}, torch.tensor([len(s) - 1 for s in seqs])


def right_pad(rows: Sequence[torch.Tensor], t: int) -> torch.Tensor:
    """Stack ``[T_i, d]`` tensors into ``[B, t, d]``, zeros after each row's tokens."""
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[-1])
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


class Passes:
    """Runs the selection's forward passes and counts them (``forwards``/``rows`` per phase, ``seconds``)."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.model = model
        self.adapter = get_adapter(model)
        self.batch_size = max(1, batch_size)
        self.device = input_device(model)
        self.forwards: Counter = Counter()
        self.rows: Counter = Counter()
        self.seconds: Counter = Counter()
        self.kl_early_exits = 0
        self.tail_forwards = 0
        self.prefix_ok: bool | None = None  # decided by the first check_prefix
        self.cache_name = cache_argument(model)
        # phase -> key -> {prompt index: per-row score}: what the bootstrap resamples (no extra forwards)
        self.per_prompt: dict[str, dict[Key, dict[int, float]]] = {}

    # ------------------------------------------------------------------ basics
    @torch.no_grad()
    def logits(self, phase: str, inputs: Inputs, **extra: object) -> torch.Tensor:
        """Logits ``[B, vocab]`` (float32, CPU) at each row's last real token."""
        kwargs, last = inputs
        t = next(iter(kwargs.values())).shape[1]
        keep = t - int(last.min())
        out = self.model(**kwargs, **extra, use_cache=self.cache_name in extra, logits_to_keep=keep)
        self.forwards[phase] += 1
        self.rows[phase] += len(last)
        return out.logits[torch.arange(len(last)), (last - (t - keep)).to(out.logits.device)].float().cpu()

    def _rows(
        self,
        prompts: PromptSet,
        keys: Sequence[Key],
        forward: Callable[[list[int], list[Key]], torch.Tensor],
        consume: Callable[[list[int], list[Key], torch.Tensor], None],
        skip: set | None = None,
        order: Sequence[int] | None = None,
    ) -> None:
        """Every (prompt, key) row, prompt-major (in length order unless ``order`` is given); keys in ``skip``
        are dropped on the way."""
        rows = [(i, k) for i in (prompts.order if order is None else order) for k in keys]
        pos = 0
        while pos < len(rows):
            batch: list[tuple[int, Key]] = []
            while pos < len(rows) and len(batch) < self.batch_size:
                if not skip or rows[pos][1] not in skip:
                    batch.append(rows[pos])
                pos += 1
            if batch:
                idx, ks = [i for i, _ in batch], [k for _, k in batch]
                consume(idx, ks, forward(idx, ks))

    # ------------------------------------------------------------------ shared prefix
    @torch.no_grad()
    def _prefix_cache(self, phase: str, prompts: PromptSet, dirs: torch.Tensor | None) -> object:
        """KV cache of the shared prefix, one row per direction (ablated) or a single plain row."""
        n, p = (1 if dirs is None else len(dirs)), prompts.prefix
        ids = torch.tensor(prompts.ids[0][:p], device=self.device).expand(n, p)
        with nullcontext() if dirs is None else ablate_direction(self.model, dirs, self.adapter):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.forwards[phase + " prefix"] += 1
        self.rows[phase + " prefix"] += n
        return returned_cache(out)

    def _from_prefix(self, phase: str, prompts: PromptSet, idx: list[int], cache: object, rows: list[int]):
        """Logits of prompts ``idx`` continuing the prefix cache's rows ``rows``."""
        cache = copy.deepcopy(cache)  # a forward appends to it
        cache.batch_select_indices(torch.tensor(rows, device=self.device))
        return self.logits(phase, prompts.batch(idx, prompts.prefix), **{self.cache_name: cache})

    def check_prefix(self, prompts: PromptSet, base: torch.Tensor) -> bool:
        """Whether continuing a cached prefix reproduces the baseline logits (decided once per run)."""
        if prompts.prefix == 0 or len(prompts) < 2:
            return False
        if self.prefix_ok is None:
            t0 = time.perf_counter()
            idx = sorted({prompts.order[0], prompts.order[-1]})
            try:
                cache = self._prefix_cache("check", prompts, None)
                got = self._from_prefix("check", prompts, idx, cache, [0] * len(idx))
                self.prefix_ok = reproduces(got, base[idx], self.adapter.embed.weight.dtype)
                why = "does not reproduce the model's logits"
            except Exception as exc:  # a cache class without batch_select_indices, say
                self.prefix_ok, why = False, f"failed ({type(exc).__name__}: {exc})"
            if not self.prefix_ok:
                _warn(f"continuing a cached prompt prefix {why}; running whole prompts (slower, same result).")
            self.seconds["check"] += time.perf_counter() - t0
        return self.prefix_ok

    # ------------------------------------------------------------------ passes
    def baseline(
        self, phase: str, prompts: PromptSet, capture: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
        """Plain logits ``[n, vocab]`` in prompt order, and ``resid_pre`` ``[T_i, d]`` per capture layer and prompt."""
        t0 = time.perf_counter()
        seen: dict[int, torch.Tensor] = {}
        fns = {(layer, "resid_pre"): (lambda x, layer=layer: seen.__setitem__(layer, x)) for layer in capture}
        parts: list[tuple[list[int], torch.Tensor]] = []
        resid: dict[int, list[torch.Tensor]] = {layer: [None] * len(prompts) for layer in capture}
        with site_hooks(self.model, fns, self.adapter):
            for start in range(0, len(prompts), self.batch_size):
                idx = prompts.order[start : start + self.batch_size]
                parts.append((idx, self.logits(phase, prompts.batch(idx))))
                for layer in capture:
                    for b, i in enumerate(idx):
                        resid[layer][i] = seen[layer][b, : len(prompts.ids[i])]
        out = torch.empty(len(prompts), parts[0][1].shape[-1])
        for idx, lg in parts:
            out[idx] = lg
        self.seconds[phase] += time.perf_counter() - t0
        return out, resid

    def ablated(
        self,
        phase: str,
        prompts: PromptSet,
        directions: dict[Key, torch.Tensor],
        per_row: RowFn,
        stop_above: float | None = None,
        shared_prefix: bool = False,
        order: Sequence[int] | None = None,
    ) -> tuple[dict[Key, float], dict[Key, int]]:
        """Sum of ``per_row`` over the prompts under each direction's ablation, and how many were scored.

        With ``stop_above``, a key whose *mean* provably exceeds it (``per_row`` ≥ 0) is not scored further;
        ``order`` (the prompts most likely to have large ``per_row`` first) makes that happen sooner.
        With ``shared_prefix``, the prompts' common prefix runs once per direction.
        """
        t0 = time.perf_counter()
        keys, n = list(directions), len(prompts)
        sums, counts, stopped = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0), set()
        slot = {k: j for j, k in enumerate(keys)}
        cache = (
            self._prefix_cache(phase, prompts, torch.stack(list(directions.values())))
            if shared_prefix and keys
            else None
        )

        def forward(idx: list[int], ks: list[Key]) -> torch.Tensor:
            with ablate_direction(self.model, torch.stack([directions[k] for k in ks]), self.adapter):
                if cache is not None:
                    return self._from_prefix(phase, prompts, idx, cache, [slot[k] for k in ks])
                return self.logits(phase, prompts.batch(idx))

        store = self.per_prompt.setdefault(phase, {})

        def consume(idx: list[int], ks: list[Key], logits: torch.Tensor) -> None:
            for i, k, v in zip(idx, ks, per_row(torch.tensor(idx), logits).tolist()):
                sums[k] += v
                counts[k] += 1
                store.setdefault(k, {})[i] = v
            if stop_above is not None:
                for k in set(ks) - stopped:
                    if counts[k] < n and (sums[k] - KL_SLACK * (n - counts[k])) / n > stop_above:
                        stopped.add(k)
                        self.kl_early_exits += 1

        self._rows(prompts, keys, forward, consume, stopped, order)
        self.seconds[phase] += time.perf_counter() - t0
        return sums, counts

    def _tail(self, prompts: PromptSet, idx: list[int], layer: int, resid: dict, add: torch.Tensor | None):
        """Logits of a forward that starts at ``layer`` from the captured residuals (``+ add`` per row)."""
        (kwargs, last) = prompts.batch(idx)
        x = right_pad([resid[layer][i] for i in idx], kwargs["input_ids"].shape[1])
        if add is not None:
            x = x + add.to(x.device, x.dtype).unsqueeze(1)
        inputs = ({"inputs_embeds": x.to(self.device), "position_ids": kwargs["position_ids"]}, last)
        with self.adapter.tail_layers(layer):
            return self.logits("induce" if add is not None else "check", inputs)

    def induced(
        self,
        prompts: PromptSet,
        directions: dict[Key, torch.Tensor],
        layer_of: dict[Key, int],
        per_row: RowFn,
        resid: dict[int, list[torch.Tensor]] | None,
    ) -> dict[Key, float]:
        """Sum of ``per_row`` over the prompts with ``+r`` added at the input of the key's layer.

        With ``resid`` (the baseline ``resid_pre`` per layer and prompt), only the layers from the key's on
        run; without it, full forwards with an addition hook.
        """
        t0 = time.perf_counter()
        sums = dict.fromkeys(directions, 0.0)
        store = self.per_prompt.setdefault("induce", {})

        def consume(idx: list[int], ks: list[Key], logits: torch.Tensor) -> None:
            for i, k, v in zip(idx, ks, per_row(torch.tensor(idx), logits).tolist()):
                sums[k] += v
                store.setdefault(k, {})[i] = v

        for layer in sorted(set(layer_of.values())):

            def forward(idx: list[int], ks: list[Key], layer: int = layer) -> torch.Tensor:
                dirs = torch.stack([directions[k] for k in ks])
                if resid is not None:
                    self.tail_forwards += 1
                    return self._tail(prompts, idx, layer, resid, dirs)
                with add_direction(self.model, dirs, layer, adapter=self.adapter):
                    return self.logits("induce", prompts.batch(idx))

            self._rows(prompts, [k for k, v in layer_of.items() if v == layer], forward, consume)
        self.seconds["induce"] += time.perf_counter() - t0
        return sums

    def check_tail(self, prompts: PromptSet, resid: dict, base: torch.Tensor, layer: int) -> bool:
        """Whether a forward from the captured ``resid_pre[layer]`` reproduces the baseline logits (a guard
        against a transformers version that changes what the decoder does to ``inputs_embeds``)."""
        t0 = time.perf_counter()
        idx = sorted({prompts.order[0], prompts.order[-1]})  # shortest and longest: padding included
        ok = reproduces(self._tail(prompts, idx, layer, resid, None), base[idx], resid[layer][idx[0]].dtype)
        if not ok:
            _warn(
                f"{self.adapter.family}: a forward from layer {layer}'s residual does not reproduce the model's "
                "logits; scoring the induce filter with full forwards (slower, same result)."
            )
        self.seconds["check"] += time.perf_counter() - t0
        return ok


def reproduces(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a shortcut's output equals the plain forward's, up to ``dtype``'s rounding."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return bool((got - want).abs().max() <= tol * (1 + want.abs().max()))


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)
