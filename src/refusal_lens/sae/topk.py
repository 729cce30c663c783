"""TopK SAE with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z     = ReLU(W_enc (x - b_dec) + b_enc)
    f     = z with all but its k largest entries set to 0           (so L0 <= k, exactly k in practice)
    loss  = ||x - x_hat||^2 + aux_coeff * ||e - W_dec topk_aux(z restricted to dead latents)||^2

Sparsity is set by k, so there is no penalty to tune and no shrinkage. AuxK asks the *dead* latents to
model the residual e = x - x_hat, which gives them gradient and revives most of them. A latent is dead
after ``dead_tokens`` training tokens without firing; k_aux defaults to d_in/2 and aux_coeff to 1/32.
Decoder rows are unit norm. Suggested lr: 2e-4 / sqrt(d_sae / 2^14).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SAE, SAEConfig, register


def keep_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of the last axis."""
    k = min(k, z.shape[-1])
    values, indices = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, values)


@register
class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if cfg.k <= 0 or cfg.k > cfg.width:
            from ..errors import UserError

            raise UserError(f"k={cfg.k} must be between 1 and the SAE width {cfg.width}; change --k.")
        self.k = cfg.k
        self.k_aux = cfg.k_aux or max(1, self.d_in // 2)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))

    def initialize(self, generator: torch.Generator | None = None) -> None:
        self._init_tied(generator)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(torch.relu(self.pre_acts(x)), self.k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        """Training-time sparsification of the ReLU pre-activations (BatchTopK overrides this)."""
        return keep_topk(z, self.k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = torch.relu(self.pre_acts(x))
        f = self.select(z) if self.training else self.encode(x)
        x_hat = self.decode(f)
        return x_hat, f, {"auxk": self.aux_coeff_loss(x, x_hat, z)}

    def aux_coeff_loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coeff == 0:
            return x_hat.new_zeros(())
        residual = (x.to(x_hat.dtype) - x_hat).detach()
        z_dead = torch.where(dead, z, torch.full_like(z, -1.0))
        f_aux = torch.relu(keep_topk(z_dead, min(self.k_aux, n_dead)))
        e_hat = f_aux @ self.W_dec
        return self.cfg.aux_coeff * (residual - e_hat).pow(2).sum(-1).mean()
