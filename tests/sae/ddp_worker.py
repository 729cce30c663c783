"""Launched by test_distributed.py under torchrun: trains on a planted stream and saves rank 0's result."""

from __future__ import annotations

import os
import sys

import torch

from refusal_lens.sae import SAEConfig, TensorStream, TrainConfig, Trainer, create_sae
from refusal_lens.sae.trainer import init_distributed, shutdown_distributed

D, M, BATCH, STEPS = 16, 48, 64, 24


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(32, D, generator=g)
    active = torch.rand(4096, 32, generator=g) < 0.1
    return 5.0 * (active * torch.rand(4096, 32, generator=g)) @ feats


def train(out: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    saes = {a: create_sae(SAEConfig(arch=a, d_in=D, width=M, k=4, dead_tokens=512), g) for a in ("topk", "standard")}
    cfg = TrainConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=3e-3, progress=False, resample_every=10)
    trained = Trainer(saes, TensorStream(data(), BATCH, shuffle=True), cfg).run()
    return {n: {k: v.clone() for k, v in s.state_dict().items()} for n, s in trained.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world = init_distributed()
    result = train()
    if rank == 0:
        torch.save({"world": world, "saes": result}, sys.argv[1])
    shutdown_distributed()
    # Like `refusal-lens sae train`: skip the interpreter teardown, where gloo threads can abort the process.
    sys.stdout.flush()
    os._exit(0)
