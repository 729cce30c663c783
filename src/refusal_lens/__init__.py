"""refusal-lens: study how chat language models refuse.

The Python API mirrors the commands (everything is importable from the package root):

    >>> from refusal_lens import load_model, compute_direction, ablate_direction   # doctest: +SKIP
    >>> model, tok = load_model()                      # the built-in model organism
    >>> result = compute_direction(model, tok, harmful, harmless)
    >>> with ablate_direction(model, result.direction.vector):
    ...     ...
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module; imported on first use so `import refusal_lens` stays fast
_EXPORTS = {
    "load_model": "models",
    "get_adapter": "adapters",
    "ChatFormatter": "prompts",
    "load_prompts": "data",
    "Prompt": "data",
    "compute_direction": "direction",
    "Direction": "direction",
    "DirectionConfig": "direction",
    "SelectionConfig": "selection",
    "select_direction": "selection",
    "mean_activations": "activations",
    "ablate_direction": "interventions",
    "add_direction": "interventions",
    "apply_direction": "interventions",
    "orthogonalize_model": "orthogonalize",
    "orthogonalize_checkpoint": "orthogonalize",
    "save_orthogonalized": "orthogonalize",
    "evaluate_conditions": "evaluation",
    "standard_conditions": "evaluation",
    "EvalSettings": "evaluation",
    "generate": "generation",
    "decompose_direction": "decompose",
    "upstream_features": "upstream",
    "refusal_gradient": "upstream",
    "word_ground_truth": "ground_truth",
    "word_mediation": "mediation",
    "ablate_latent": "latents",
    "add_latent": "latents",
    "clamp_latent": "latents",
    "run_demo": "demo",
    "UserError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'refusal_lens' has no attribute {name!r}")
