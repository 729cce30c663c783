"""Activation streams that do not need a model: in-memory tensors, per-process slices, on-disk caches.

A *stream* hands out batches ``[batch_size, d_in]`` of float32 activations and can report and restore its
position exactly (``state_dict`` / ``load_state_dict``); ``fresh()`` gives a copy at the start. The
model-backed stream is :class:`refusal_lens.sae.source.ActivationSource`.

* :class:`TensorStream` serves a tensor in memory (tests, small experiments).
* :class:`RankSlice` is one process's share of every global batch (data-parallel training).
* :func:`write_activation_cache` / :class:`CachedStream` store a stream as safetensors shards and replay
  it, so several SAEs (or several runs) are trained from one pass through the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..core.errors import UserError
from ..core.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json


class Stream(Protocol):
    d_in: int
    batch_size: int

    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def fresh(self) -> Stream: ...


class TensorStream:
    """Batches from an in-memory ``[n, d]`` tensor, cycling (reshuffled per epoch when ``shuffle``)."""

    def __init__(self, data: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0):
        if data.ndim != 2 or data.shape[0] < batch_size:
            raise UserError(
                f"activation tensor of shape {tuple(data.shape)} holds fewer than one batch "
                f"({batch_size}); collect more tokens or lower --batch-size."
            )
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.d_in = data.shape[1]
        self.position = 0

    def _order(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        return torch.randperm(self.data.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_batch(self) -> torch.Tensor:
        n, b = self.data.shape[0], self.batch_size
        per_epoch = n // b
        epoch, k = divmod(self.position, per_epoch)
        self.position += 1
        order = self._order(epoch)
        rows = torch.arange(k * b, (k + 1) * b) if order is None else order[k * b : (k + 1) * b]
        return self.data[rows].float()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def fresh(self) -> TensorStream:
        return TensorStream(self.data, self.batch_size, self.shuffle, self.seed)


class RankSlice:
    """This process's share of each global batch of ``stream`` (data-parallel training)."""

    def __init__(self, stream: Stream, rank: int, world: int):
        if stream.batch_size % world:
            raise UserError(f"batch size {stream.batch_size} is not divisible by {world} processes; change it.")
        self.stream, self.rank, self.world = stream, rank, world
        self.d_in, self.batch_size = stream.d_in, stream.batch_size // world

    def next_batch(self) -> torch.Tensor:
        b = self.batch_size
        return self.stream.next_batch()[self.rank * b : (self.rank + 1) * b]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def fresh(self) -> RankSlice:
        return RankSlice(self.stream.fresh(), self.rank, self.world)


# ---------------------------------------------------------------------------------------------- cache
def write_activation_cache(
    stream: Stream,
    out_dir: str | Path,
    n_tokens: int,
    shard_tokens: int = 1 << 16,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``n_tokens`` activations of ``stream`` (in stream order) as safetensors shards + index.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, pending, n_pending, written = [], [], 0, 0
    while written + n_pending < n_tokens:
        batch = stream.next_batch()
        pending.append(batch)
        n_pending += batch.shape[0]
        while n_pending >= shard_tokens or (written + n_pending >= n_tokens and n_pending):
            data = torch.cat(pending)
            take = min(shard_tokens, n_tokens - written, data.shape[0])
            name = f"shard_{len(shards):05d}.safetensors"
            atomic_save_safetensors({"activations": data[:take]}, out / name)
            shards.append({"file": name, "tokens": take})
            written += take
            pending, n_pending = ([data[take:]], data.shape[0] - take) if take < data.shape[0] else ([], 0)
            if written >= n_tokens:
                break
    atomic_write_json(
        out / "index.json",
        {"d_in": stream.d_in, "n_tokens": written, "shards": shards, "metadata": metadata or {}},
    )
    return out


class CachedStream:
    """Batches replayed from :func:`write_activation_cache` output, cycling at the end."""

    def __init__(self, cache_dir: str | Path, batch_size: int):
        self.dir = Path(cache_dir)
        index = read_json(self.dir / "index.json", what="activation cache index")
        self.shards = [(s["file"], int(s["tokens"])) for s in index["shards"]]
        self.n_tokens, self.d_in = int(index["n_tokens"]), int(index["d_in"])
        self.metadata = index.get("metadata", {})
        if self.n_tokens < batch_size:
            raise UserError(f"activation cache {self.dir} holds {self.n_tokens} tokens, fewer than one batch.")
        self.batch_size = batch_size
        self.position = 0  # tokens served so far
        self._loaded: tuple[int, torch.Tensor] | None = None

    def _shard(self, i: int) -> torch.Tensor:
        if self._loaded is None or self._loaded[0] != i:
            t = load_safetensors(self.dir / self.shards[i][0], what="activation cache shard")["activations"]
            self._loaded = (i, t)
        return self._loaded[1]

    def _rows(self, start: int, count: int) -> torch.Tensor:
        out, offset = [], 0
        for i, (_, n) in enumerate(self.shards):
            lo, hi = max(start, offset), min(start + count, offset + n)
            if lo < hi:
                out.append(self._shard(i)[lo - offset : hi - offset])
            offset += n
        return torch.cat(out)

    def next_batch(self) -> torch.Tensor:
        start = self.position % self.n_tokens
        if start + self.batch_size > self.n_tokens:  # wrap: skip the incomplete tail
            self.position += self.n_tokens - start
            start = 0
        self.position += self.batch_size
        return self._rows(start, self.batch_size).float()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def fresh(self) -> CachedStream:
        return CachedStream(self.dir, self.batch_size)
