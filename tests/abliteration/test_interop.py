"""Exports of abliterate read by their real clients outside refusal-lens: repeng reads our GGUF control vector.

repeng is optional and pins ``numpy<2`` (its module uses ``np.float_``, removed in NumPy 2), so CI runs this
in a side environment with NumPy 1.26 and torch/transformers kept as installed (see .ci/run). The test skips
with the reason when repeng is absent or cannot be imported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_lens.abliteration.exports import control_vectors, save_control_vector
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.variants import DirectionSet
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS


def _import_repeng():
    pytest.importorskip("gguf")
    try:
        import repeng
    except ImportError as exc:
        pytest.skip(f"repeng is not installed (pip install --no-deps repeng; it needs numpy<2): {exc}")
    except AttributeError as exc:  # repeng 0.4 under NumPy 2: np.float_ in a type hint
        pytest.skip(f"repeng cannot be imported with NumPy {np.__version__} (it needs numpy<2): {exc}")
    return repeng


def test_repeng_import_gguf_reads_our_control_vector_exactly(tokenizer, tmp_path):
    repeng = _import_repeng()
    model = random_model("llama", n_layers=4)
    ds = DirectionSet.from_prompts(model, ChatFormatter(tokenizer), HARMFUL, HARMLESS)
    for index, blocks in ((2.6, [2]), (0.4, [1])):  # slot 3 is block 2's output; block 0 is moved to block 1
        ours = control_vectors(ds.raw, index)
        save_control_vector(ours, tmp_path / "control_vector.gguf", "tiny-llama", ds.n_layers)
        theirs = repeng.ControlVector.import_gguf(str(tmp_path / "control_vector.gguf"))
        assert theirs.model_type == "tiny-llama" and sorted(theirs.directions) == blocks
        for block, vector in ours.items():
            got = theirs.directions[block]
            assert got.dtype == np.float32 and np.array_equal(got, vector.numpy())
            assert torch.equal(vector, (-ds.raw[block + 1]).float())  # −r at the slot the block writes
