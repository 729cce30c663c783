"""ReLU SAE of Anthropic's April 2024 update ("Circuits Updates — April 2024").

    f     = ReLU(W_enc x + b_enc)                     (no b_dec subtracted from the input)
    x_hat = W_dec f + b_dec
    loss  = ||x - x_hat||^2 + lambda * sum_k f_k ||W_dec[k]||

The decoder is unconstrained: weighting each latent's L1 by its decoder norm makes the penalty invariant
to trading scale between f and W_dec, so no renormalisation is needed. The encoder starts as the
transpose of the decoder, whose rows start with norm 0.1. The schedule (lambda warm-up over the first 5 %,
lr decay over the last 20 %, gradient clipping, E||x|| = sqrt(d) scaling) lives in the trainer.
At inference this is the SAELens "standard" architecture with ``apply_b_dec_to_input = False``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SAE, SAEConfig


class AprilSAE(SAE):
    arch = "april"
    saelens_arch = "standard"
    default_sparsity_coeff = 0.08
    unit_norm_decoder = False
    default_apply_b_dec = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))

    def initialize(self, generator: torch.Generator | None = None) -> None:
        self._init_tied(generator, row_norm=0.1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        f = self.encode(x)
        sparsity = self.sparsity_coeff * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self.decode(f), f, {"sparsity": sparsity}
