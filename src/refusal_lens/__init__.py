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
    "load_model": "core.models",
    "get_adapter": "core.adapters",
    "ChatFormatter": "core.prompts",
    "load_prompts": "organism",
    "Prompt": "core.data",
    "compute_direction": "direction.compute",
    "Direction": "direction.compute",
    "DirectionConfig": "direction.compute",
    "SelectionConfig": "direction.selection",
    "select_direction": "direction.selection",
    "mean_activations": "direction.activations",
    "ablate_direction": "direction.interventions",
    "add_direction": "direction.interventions",
    "apply_direction": "direction.interventions",
    "orthogonalize_model": "direction.orthogonalize",
    "orthogonalize_checkpoint": "direction.orthogonalize",
    "save_orthogonalized": "direction.orthogonalize",
    "evaluate_conditions": "evaluation.conditions",
    "standard_conditions": "evaluation.conditions",
    "EvalSettings": "evaluation.conditions",
    "generate": "evaluation.generation",
    "decompose_direction": "lens.decompose",
    "upstream_features": "lens.upstream",
    "refusal_gradient": "lens.upstream",
    "word_ground_truth": "lens.ground_truth",
    "word_mediation": "lens.mediation",
    "ablate_latent": "lens.latents",
    "add_latent": "lens.latents",
    "clamp_latent": "lens.latents",
    "run_demo": "pipelines.demo",
    "UserError": "core.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'refusal_lens' has no attribute {name!r}")
