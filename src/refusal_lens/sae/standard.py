"""Standard ReLU SAE with an L1 penalty (Anthropic, "Towards Monosemanticity", 2023).

    f     = ReLU(W_enc (x - b_dec) + b_enc)
    x_hat = W_dec f + b_dec
    loss  = ||x - x_hat||^2 + lambda * ||f||_1

Decoder rows are kept at unit norm (otherwise the L1 penalty is dodged by shrinking f and growing W_dec):
the gradient component parallel to each row is removed before the step and rows are renormalised after.
Latents that stop firing are *resampled*: pointed at inputs the SAE reconstructs badly.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SAE, SAEConfig


class StandardSAE(SAE):
    arch = "standard"
    saelens_arch = "standard"
    default_sparsity_coeff = 0.08

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))

    def initialize(self, generator: torch.Generator | None = None) -> None:
        self._init_tied(generator, enc_scale=self._dense_enc_scale())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        f = self.encode(x)
        sparsity = self.sparsity_coeff * f.abs().sum(-1).mean()
        return self.decode(f), f, {"sparsity": sparsity}

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """Re-initialise dead latents on badly reconstructed inputs from the batch ``x``.

        Inputs are drawn with probability proportional to their squared reconstruction error; the dead
        latent's decoder row becomes the normalised (centred) input and its encoder column the same
        direction scaled to 0.2 x the mean encoder norm of the live latents, so it starts small. The Adam
        moments of the touched weights are zeroed, or their stale momentum would undo the reset.
        Returns the number of latents resampled.
        """
        dead = self.dead_mask().nonzero().flatten()
        if dead.numel() == 0:
            return 0
        x_hat = self.decode(self.encode(x))
        err = (x.to(x_hat.dtype) - x_hat).pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return 0
        idx = torch.multinomial(err / err.sum(), dead.numel(), replacement=True, generator=generator)
        v = x[idx].to(self.W_dec.dtype) - self.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~self.dead_mask()
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        self.W_dec[dead] = v
        self.W_enc[:, dead] = v.T * 0.2 * enc_norm
        self.b_enc[dead] = 0.0
        self.tokens_since_fired[dead] = 0
        _zero_adam_state(optimizer, self.W_dec, (dead, slice(None)))
        _zero_adam_state(optimizer, self.W_enc, (slice(None), dead))
        _zero_adam_state(optimizer, self.b_enc, (dead,))
        return int(dead.numel())


def _zero_adam_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, index: tuple) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0.0
