"""Stage 3, sparse autoencoders (Kissane et al. 2024, "SAEs are highly dataset dependent"): activations → SAE.

Six architectures, activation sources from chat-formatted or plain text, training, evaluation and
interchange formats. Imports core and organism (the organism's corpus is the default data for the organism).

Sparse autoencoders: six architectures, activation streams, training, evaluation and interchange formats.

Example:
    >>> from refusal_lens.sae import SAEConfig, create_sae
    >>> sae = create_sae(SAEConfig(arch="topk", d_in=64, width=256, k=8))
    >>> x_hat, f, aux = sae(torch.randn(10, 64))  # doctest: +SKIP
"""

from __future__ import annotations

from .base import ARCHITECTURES, SAE, SAEConfig, reconstruction_loss
from .evaluate import EvalConfig, evaluate_sae, reconstruction_metrics, spliced_loss_metrics
from .formats import load_sae, save_saelens, save_sparsify
from .registry import create_sae
from .source import ActivationSource, DataConfig
from .streams import CachedStream, RankSlice, TensorStream, write_activation_cache
from .trainer import TrainConfig, Trainer, train_saes

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAEConfig",
    "create_sae",
    "reconstruction_loss",
    "EvalConfig",
    "evaluate_sae",
    "reconstruction_metrics",
    "spliced_loss_metrics",
    "load_sae",
    "save_saelens",
    "save_sparsify",
    "ActivationSource",
    "CachedStream",
    "DataConfig",
    "TensorStream",
    "RankSlice",
    "write_activation_cache",
    "TrainConfig",
    "Trainer",
    "train_saes",
]
