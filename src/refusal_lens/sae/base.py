"""The SAE base class and the configuration shared by every architecture.

Every architecture computes ``x_hat = f @ W_dec + b_dec`` from latents ``f = encode(x)`` and stores its
parameters under the SAELens v6 names (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
plus its own), so saving is a plain state-dict copy. ``forward`` returns ``(x_hat, f, aux)`` where ``aux``
holds the architecture's extra loss terms *already multiplied by their coefficients*; the key
``"sparsity"`` is the term the trainer warms up. The reconstruction loss itself is computed by the trainer
(:func:`reconstruction_loss`), so all architectures are compared on the same footing.

Training-only state (dead-latent counters, EMA thresholds) lives in buffers so that checkpoints carry it,
but only :meth:`SAE.export_tensors` is written to the interchange formats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config_args import at_least, fraction, positive
from ..core.errors import UserError

ARCHITECTURES = ("standard", "april", "gated", "topk", "batchtopk", "jumprelu")


@dataclass
class SAEConfig:
    """Shape and sparsity hyperparameters of one SAE (fields double as CLI help)."""

    arch: str = field(
        default="topk",
        metadata={
            "help": "architecture: standard (2023 ReLU-L1), april (Apr-2024 ReLU-L1), gated, topk, batchtopk, jumprelu"
        },
    )
    d_in: int = field(default=0, metadata={"help": "input width (the model's d_model; filled in automatically)"})
    width: int = field(default=4096, metadata={**at_least(1), "help": "number of latents d_sae"})
    k: int = field(default=32, metadata={**at_least(1), "help": "active latents per token (topk, batchtopk)"})
    sparsity_coeff: float | None = field(
        default=None,
        metadata={
            **at_least(0),
            "help": "lambda of the sparsity penalty (L1 / weighted L1 / gate L1 / L0); default depends on --arch",
        },
    )
    aux_coeff: float = field(
        default=1 / 32, metadata={**at_least(0), "help": "weight of the AuxK loss (topk, batchtopk)"}
    )
    k_aux: int | None = field(
        default=None, metadata={**at_least(1), "help": "dead latents used by AuxK (default d_in/2)"}
    )
    dead_tokens: int = field(
        default=1_000_000,
        metadata={**at_least(1), "help": "a latent that has not fired for this many training tokens counts as dead"},
    )
    bandwidth: float = field(
        default=1e-3, metadata={**positive(), "help": "JumpReLU straight-through kernel bandwidth"}
    )
    init_threshold: float | None = field(
        default=None,
        metadata={
            **at_least(0),
            "help": "initial JumpReLU threshold (default: where ~5% of latents fire at initialisation)",
        },
    )
    threshold_momentum: float = field(
        default=0.99, metadata={**fraction(), "help": "EMA momentum of the BatchTopK inference threshold"}
    )
    apply_b_dec_to_input: bool | None = field(
        default=None, metadata={"help": "subtract b_dec before encoding (default: all but april)"}
    )
    dtype: str = field(default="float32", metadata={"help": "parameter dtype"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the model dimension, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Common interface of every architecture; subclasses fill in ``pre_acts``/``activation``."""

    arch: ClassVar[str] = ""
    #: SAELens v6 architecture name this class is written as.
    saelens_arch: ClassVar[str] = ""
    #: Parameters whose values are in activation units; rescaled when input scaling is folded in.
    activation_scaled: ClassVar[tuple[str, ...]] = ("b_enc",)
    #: Default lambda is ``default_sparsity_coeff * d_in ** sparsity_exponent``: with inputs scaled to
    #: E||x|| = sqrt(d) the reconstruction error grows like d and a latent's L1 like sqrt(d), so the same
    #: trade-off needs lambda ~ sqrt(d) for L1 penalties (Anthropic's 5 at d=4096 and Kissane et al.'s 3 at
    #: d=1024 are both ~0.08 sqrt(d)) and lambda ~ d for the L0 penalty.
    default_sparsity_coeff: ClassVar[float] = 0.0
    sparsity_exponent: ClassVar[float] = 0.5
    #: Renormalise decoder rows after each step and remove the gradient parallel to them.
    unit_norm_decoder: ClassVar[bool] = True
    default_apply_b_dec: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.d_in <= 0 or cfg.width <= 0:
            raise UserError(f"SAE width {cfg.width} and d_in {cfg.d_in} must be positive; check --width.")
        self.cfg = cfg
        self.d_in, self.d_sae = cfg.d_in, cfg.width
        dtype = getattr(torch, cfg.dtype)
        self.apply_b_dec_to_input = (
            self.default_apply_b_dec if cfg.apply_b_dec_to_input is None else cfg.apply_b_dec_to_input
        )
        self.sparsity_coeff = (
            self.default_sparsity_coeff * cfg.d_in**self.sparsity_exponent
            if cfg.sparsity_coeff is None
            else float(cfg.sparsity_coeff)
        )
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dtype))
        # Tokens since each latent last fired: drives AuxK, resampling and the dead fraction.
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))

    # ------------------------------------------------------------------ init helpers
    def _init_tied(self, generator: torch.Generator | None, row_norm: float = 1.0, enc_scale: float = 1.0) -> None:
        """Random decoder rows of norm ``row_norm`` and the encoder as their transpose times ``enc_scale``."""
        with torch.no_grad():
            w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
            w = w / w.norm(dim=1, keepdim=True) * row_norm
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T * enc_scale)

    def _dense_enc_scale(self) -> float:
        # With m random unit rows, about half the latents fire and x_hat ~ (m / 2d) x: scale the encoder by
        # 2d/m so the first reconstructions have the right size (else FVU starts far above 1).
        return min(1.0, 2.0 * self.d_in / self.d_sae)

    # ------------------------------------------------------------------ the model
    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` (inference mode: batch-independent for every arch)."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        f = self.encode(x)
        return self.decode(f), f, {}

    # ------------------------------------------------------------------ training hooks
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def record_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Update the dead-latent counters with a boolean ``[d_sae]`` 'fired in this batch' mask."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (it would only change the norm)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            g = self.W_dec.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` work on raw ``x``.

        The decoder stays as it is (unit rows stay unit); latent activations shrink by ``scale``, so every
        parameter in activation units (biases, thresholds) and ``b_dec`` is divided by ``scale``.
        """
        self.b_dec /= scale
        for name in self.activation_scaled:
            getattr(self, name).div_(scale)

    # ------------------------------------------------------------------ IO
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to SAELens ``sae_weights.safetensors`` (SAELens names and shapes)."""
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_tensors` (shapes are validated by the caller)."""
        own = dict(self.named_parameters())
        for name, t in tensors.items():
            if name in own:
                own[name].copy_(t.to(own[name].dtype))
