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

from .base import SAE, SAEConfig


def keep_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of the last axis."""
    k = min(k, z.shape[-1])
    values, indices = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, values)


class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if cfg.k <= 0 or cfg.k > cfg.width:
            from ..core.errors import UserError

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
        if self.training and type(self).select is TopKSAE.select:
            return self._sparse_forward(x)
        z = torch.relu(self.pre_acts(x))
        f = self.select(z) if self.training else self.encode(x)
        x_hat = self.decode(f)
        return x_hat, f, {"auxk": self.aux_coeff_loss(x, x_hat, z)}

    def _aux_indices(self, z: torch.Tensor) -> torch.Tensor | None:
        """Positions of the k_aux largest pre-activations among dead latents (None: AuxK is off)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coeff == 0:
            return None
        z_dead = torch.where(dead, z, torch.full_like(z, -1.0))
        return z_dead.topk(min(self.k_aux, n_dead), dim=-1, sorted=False).indices

    def _sparse_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training forward computing only what the loss uses: the same values as the dense path.

        The dense path multiplies [batch, width] latent matrices that are almost all zeros through the
        decoder and, in backward, through both decoder and encoder (five batch x width x d_in matmuls
        besides the encoder's forward one). Here the decoder reads only the selected rows
        (``embedding_bag``) and :class:`_GatherLatents` routes the gradient to the selected
        pre-activations only. Same selection, same losses, up to float summation order.
        """
        x = x.to(self.W_enc.dtype)
        with torch.no_grad():  # selection only; gradients come from _GatherLatents
            z = torch.relu(self.pre_acts(x))
            idx = z.topk(min(self.k, self.d_sae), dim=-1, sorted=False).indices
            aux_idx = self._aux_indices(z)
        k = idx.shape[1]
        both = idx if aux_idx is None else torch.cat([idx, aux_idx], dim=1)
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        vals = _GatherLatents.apply(x, b_dec, self.W_enc, self.b_enc, z, both)
        x_hat = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals[:, :k], mode="sum") + self.b_dec
        with torch.no_grad():  # the trainer's firing statistics need the dense latents
            f = torch.zeros_like(z).scatter_(-1, idx, vals[:, :k])
        if aux_idx is None:
            return x_hat, f, {"auxk": x_hat.new_zeros(())}
        residual = (x - x_hat).detach()
        e_hat = nn.functional.embedding_bag(aux_idx, self.W_dec, per_sample_weights=vals[:, k:], mode="sum")
        return x_hat, f, {"auxk": self.cfg.aux_coeff * (residual - e_hat).pow(2).sum(-1).mean()}

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


class _GatherLatents(torch.autograd.Function):
    """``relu(pre_acts)`` at ``idx`` [batch, n] with a backward that touches only those positions.

    Forward reuses the dense ReLU pre-activations ``z`` computed for the selection (so values are
    bit-identical to the dense path). Backward: the latent gradient is zero off ``idx`` and where the
    ReLU is off, so W_enc's gradient is a sparse [width, batch] x [batch, d_in] product, b_enc's a
    scatter-add, and b_dec's (through x - b_dec) -W_enc @ (b_enc's gradient): no dense matmul at all.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, z, idx):  # type: ignore[override]
        vals = z.gather(-1, idx)
        ctx.save_for_backward(x, b_dec, W_enc, idx, vals > 0)
        ctx.has_b_dec = b_dec is not None
        return vals

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, b_dec, W_enc, idx, on = ctx.saved_tensors
        g = grad * on  # ReLU'(pre) at the gathered positions
        batch, d_sae = x.shape[0], W_enc.shape[1]
        flat_idx = idx.reshape(-1)
        g_benc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, g.reshape(-1))
        grad_x = grad_bdec = grad_wenc = None
        if ctx.needs_input_grad[2]:
            sae_in = x - b_dec if ctx.has_b_dec else x
            rows = torch.arange(batch, device=x.device).repeat_interleave(idx.shape[1])
            g_lat = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), g.reshape(-1), (d_sae, batch), check_invariants=False
            )
            grad_wenc = torch.sparse.mm(g_lat, sae_in).T  # [d_in, width], the layout of W_enc
        if ctx.needs_input_grad[0] or (ctx.has_b_dec and ctx.needs_input_grad[1]):
            if ctx.needs_input_grad[0]:
                g_dense = torch.zeros(batch, d_sae, dtype=g.dtype, device=g.device).scatter_add_(-1, idx, g)
                grad_x = g_dense @ W_enc.T
            if ctx.has_b_dec and ctx.needs_input_grad[1]:
                grad_bdec = -(W_enc @ g_benc)
        return grad_x, grad_bdec, grad_wenc, g_benc if ctx.needs_input_grad[3] else None, None, None
