"""Models split over devices (``--device-map``), simulated on one CPU.

A CPU-only machine has one device, so the split is simulated with dtypes: the embedding and the first layers
stay float32, the later layers, final norm and unembedding become float64, and each of those modules gets an
accelerate-style forward wrapper that converts its floating inputs to its own dtype first (accelerate's
``AlignDevicesHook`` moves them to its device the same way, also *after* PyTorch forward pre-hooks ran). Our
hooks then meet activations of two kinds at different layers and must convert the direction per (device,
dtype), exactly the code path a real split takes. What this does not exercise: real device transfers
(cuda:0 -> cuda:1), accelerate itself, and CPU/disk offload (only its guard is tested, with a meta weight).
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from refusal_lens.cli.main import build_parser
from refusal_lens.cli.sae_train_eval import rank_device
from refusal_lens.core.adapters import get_adapter
from refusal_lens.core.errors import UserError
from refusal_lens.core.models import load_model, parse_device_map
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction import interventions
from refusal_lens.direction.activations import mean_activations
from refusal_lens.direction.interventions import ablate_direction, add_direction
from refusal_lens.direction.orthogonalize import orthogonalize_model
from refusal_lens.evaluation.conditions import OrthogonalizedWeights
from refusal_lens.evaluation.generation import GenerationSettings, generate
from refusal_lens.testing import random_model

from ..conftest import HARMFUL, HARMLESS

N_LAYERS, SPLIT = 4, 2  # layers 0-1 on the "first device" (float32), 2-3 + norm + lm_head on the second (float64)


def _cast(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _align(module: nn.Module) -> None:
    """Wrap ``module.forward`` like accelerate's hooks do: inputs go to the module's own dtype ("device")."""
    dtype = next(module.parameters()).dtype
    forward = module.forward

    def aligned(*args, **kwargs):
        return forward(*_cast(args, dtype), **{k: _cast(v, dtype) for k, v in kwargs.items()})

    module.forward = aligned


def split_model(model: nn.Module) -> nn.Module:
    split = copy.deepcopy(model)
    adapter = get_adapter(split)
    second = [*adapter.layers[SPLIT:], split.model.norm, split.lm_head]
    for m in second:
        m.to(torch.float64)
    for m in [adapter.embed, *adapter.layers, split.model.norm, split.lm_head]:
        _align(m)
    return split


@pytest.fixture(scope="module")
def models():
    base = random_model("llama", n_layers=N_LAYERS, d_model=32)
    return split_model(base), copy.deepcopy(base).double()  # the split model, and one device in float64


@pytest.fixture(scope="module")
def direction():
    return torch.randn(32, generator=torch.Generator().manual_seed(3)) * 4


@pytest.fixture
def seen(monkeypatch):
    """The (device, dtype) pairs the hooks converted the direction to."""
    keys = set()
    original = interventions._as_rows

    def spy(direction, x, cache=None):
        keys.add((x.device.type, x.dtype))
        return original(direction, x, cache)

    monkeypatch.setattr(interventions, "_as_rows", spy)
    return keys


def _logits(model, tokenizer, context=None):
    batch = ChatFormatter(tokenizer).encode(HARMFUL[:3] + HARMLESS[:3])
    with torch.no_grad(), context() if context else nullcontext():
        return model(**batch, use_cache=False).logits.double()


def test_the_split_is_real(models, tokenizer):
    split, ref = models
    dtypes = {p.dtype for p in split.parameters()}
    assert dtypes == {torch.float32, torch.float64}
    torch.testing.assert_close(_logits(split, tokenizer), _logits(ref, tokenizer), atol=1e-4, rtol=1e-4)


def test_ablation_follows_the_activations(models, tokenizer, direction, seen):
    split, ref = models
    got = _logits(split, tokenizer, lambda: ablate_direction(split, direction))
    assert seen == {("cpu", torch.float32), ("cpu", torch.float64)}  # one converted copy per "device"
    want = _logits(ref, tokenizer, lambda: ablate_direction(ref, direction))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - _logits(ref, tokenizer)).abs().max() > 1e-2  # the ablation does change the logits


@pytest.mark.parametrize("layer", [SPLIT - 1, SPLIT, N_LAYERS - 1])
def test_addition_at_either_side_of_the_split(models, tokenizer, direction, layer):
    split, ref = models
    got = _logits(split, tokenizer, lambda: add_direction(split, direction, layer, 1.5))
    want = _logits(ref, tokenizer, lambda: add_direction(ref, direction, layer, 1.5))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_capture_is_the_same(models, tokenizer):
    split, ref = models
    fmt = ChatFormatter(tokenizer)
    got = mean_activations(split, fmt, HARMFUL, batch_size=4, progress=False)
    want = mean_activations(ref, fmt, HARMFUL, batch_size=4, progress=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generation_and_weight_edit_under_the_split(models, tokenizer, direction):
    split, ref = models
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    prompts = HARMFUL[:3] + HARMLESS[:3]
    got = generate(split, tokenizer, prompts, lambda: ablate_direction(split, direction), settings, progress=False)
    want = generate(ref, tokenizer, prompts, lambda: ablate_direction(ref, direction), settings, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    edited = _logits(split, tokenizer, OrthogonalizedWeights(split, direction))  # writers in two dtypes
    torch.testing.assert_close(edited, _logits(ref, tokenizer, lambda: ablate_direction(ref, direction)),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_offloaded_weights_are_not_edited_silently(direction):
    model = random_model("llama", n_layers=2, d_model=32)
    o_proj = get_adapter(model).layers[1].self_attn.o_proj
    o_proj.weight = nn.Parameter(torch.empty(o_proj.weight.shape, device="meta"), requires_grad=False)
    with pytest.raises(UserError, match="offloaded"):
        OrthogonalizedWeights(model, direction)
    with pytest.raises(UserError, match="offloaded"):
        orthogonalize_model(model, direction)


def test_device_map_option(saved_model):
    assert parse_device_map("auto") == "auto" and parse_device_map(None) is None
    assert parse_device_map('{"model.embed_tokens": 0, "": 1}') == {"model.embed_tokens": 0, "": 1}
    with pytest.raises(UserError, match="JSON"):
        parse_device_map("{model: 0")
    parser = build_parser("all")
    commands = (["evaluate"], ["direction"], ["orthogonalize", "--direction", "d"], ["sae", "train", "--layer", "1"])
    for argv in commands:
        assert parser.parse_args([*argv, "--out", "x", "--device-map", "auto"]).device_map == "auto"
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(UserError, match="pip install accelerate"):
            load_model(saved_model, device_map="auto")


def test_sae_ranks_take_their_own_gpu():
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert rank_device("cuda", env) == "cuda:3"
    assert rank_device("cuda:1", env) == "cuda:1" and rank_device(None, env) is None
    assert rank_device("cuda", {}) == "cuda"
