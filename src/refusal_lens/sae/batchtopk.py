"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training: z = ReLU(W_enc (x - b_dec) + b_enc) for a batch of B tokens; keep the B*k largest entries of
the whole batch (tokens may use more or fewer than k latents, k on average), plus TopK's AuxK loss.

Inference must not depend on the other tokens in a batch, so a single global threshold replaces the
batch-level selection: after every training batch the smallest kept activation is folded into an
exponential moving average, and at inference f = z * 1[z > threshold]. That is exactly a JumpReLU with
the same threshold for every latent, which is how it is saved (SAELens "jumprelu").

Data parallel: each process selects the top (B/N)*k of its own slice and the thresholds are averaged
across processes after each step, so N processes approximate (not reproduce) one process on B tokens.
"""

from __future__ import annotations

import torch

from .base import SAEConfig
from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_arch = "jumprelu"
    activation_scaled = ("b_enc", "threshold")
    #: Buffers that the distributed trainer averages across processes after each step.
    averaged_buffers = ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # A negative threshold means "no training batch seen yet"; encode() then falls back to TopK.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.W_enc.dtype))

    def select(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1)
        n_keep = min(self.k * z.shape[0], flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        f = torch.zeros_like(flat).scatter(0, indices, values).reshape(z.shape)
        with torch.no_grad():
            positive = values[values > 0]
            if positive.numel():
                smallest = positive.min()
                if float(self.threshold) < 0:
                    self.threshold.copy_(smallest)
                else:
                    m = self.cfg.threshold_momentum
                    self.threshold.mul_(m).add_((1 - m) * smallest)
        return f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.pre_acts(x))
        if float(self.threshold) < 0:
            return super().encode(x)
        return z * (z > self.threshold).to(z.dtype)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = super().export_tensors()
        out["threshold"] = self.threshold.detach().expand(self.d_sae).clone()
        return out

    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_exported(tensors)
        if "threshold" in tensors:
            self.threshold.copy_(tensors["threshold"].reshape(-1)[0])
