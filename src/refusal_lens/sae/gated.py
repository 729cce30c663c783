"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

    pi_gate = W_gate (x - b_dec) + b_gate                       (W_gate is stored as W_enc)
    pi_mag  = (exp(r_mag) * W_gate) (x - b_dec) + b_mag         (r_mag rescales each latent's column)
    f       = 1[pi_gate > 0] * ReLU(pi_mag)
    loss    = ||x - x_hat||^2 + lambda * ||ReLU(pi_gate)||_1 + ||x - (W_dec^ ReLU(pi_gate) + b_dec^)||^2

The gate decides *which* latents fire, the magnitude path *how much*, so the L1 penalty (on the gate only)
no longer shrinks the magnitudes. The step function passes no gradient, so the gate is trained by the
auxiliary reconstruction through a frozen (detached, ^) copy of the decoder. Decoder rows are unit norm.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SAE, SAEConfig


class GatedSAE(SAE):
    arch = "gated"
    saelens_arch = "gated"
    activation_scaled = ("b_gate", "b_mag")
    default_sparsity_coeff = 0.08

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        dtype = self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))

    def initialize(self, generator: torch.Generator | None = None) -> None:
        self._init_tied(generator, enc_scale=self._dense_enc_scale())

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.sae_in(x) @ self.W_enc
        return h + self.b_gate, h * torch.exp(self.r_mag) + self.b_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        gate_acts = torch.relu(pi_gate)
        sparsity = self.sparsity_coeff * gate_acts.sum(-1).mean()
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x.to(via_gate.dtype) - via_gate).pow(2).sum(-1).mean()
        return self.decode(f), f, {"sparsity": sparsity, "gate_recon": aux}
