"""The architectures by name: one explicit table, so the architecture modules import base and nothing imports back."""

from __future__ import annotations

import torch

from ..core.errors import UserError
from .april import AprilSAE
from .base import ARCHITECTURES, SAE, SAEConfig
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    cls.arch: cls for cls in (StandardSAE, AprilSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}
assert tuple(REGISTRY) == ARCHITECTURES, "ARCHITECTURES in base.py lists every registered class, in order"


def create_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """Build and initialise the architecture named by ``cfg.arch``."""
    if cfg.arch not in REGISTRY:
        raise UserError(f"SAE architecture {cfg.arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}.")
    sae = REGISTRY[cfg.arch](cfg)
    sae.initialize(generator)
    return sae
