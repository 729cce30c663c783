"""The vLLM backend, without vLLM: a fake ``vllm`` module (greedy HF generation behind vLLM's API) in sys.modules.

Checks the settings mapping, that the replies are the HF path's Completion records, that ablation runs on the
orthogonalized checkpoint, that activation addition is refused, and the missing-vllm error. Real vLLM is not
exercised here.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lens.cli.main import main
from refusal_lens.core.data import Prompt
from refusal_lens.core.errors import UserError
from refusal_lens.core.models import load_model
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.compute import Direction
from refusal_lens.evaluation.generation import GenerationSettings, end_of_turn_ids, generate
from refusal_lens.evaluation.vllm_backend import (
    VLLMGenerator,
    _completion,
    import_vllm,
    sampling_params,
    vllm_interventions,
)

from ..conftest import HARMFUL, HARMLESS


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakeLLM:
    """vLLM's ``LLM`` API over HF greedy generation, one unpadded prompt at a time."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.path, self.kwargs = model, kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.params: list[FakeSamplingParams] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        outs = []
        for request, sp in zip(prompts, sampling_params):
            assert sp.temperature == 0.0, "the fake only does greedy decoding"
            self.params.append(sp)
            ids = torch.tensor([request["prompt_token_ids"]])
            with torch.no_grad():
                gen = self.hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=sp.max_tokens, do_sample=False,
                    eos_token_id=sp.stop_token_ids, pad_token_id=0,
                )  # fmt: skip
            new = gen[0, ids.shape[1] :].tolist()
            stop = next((i for i, t in enumerate(new) if t in sp.stop_token_ids), None)
            new = new if stop is None else new[: stop + 1]  # vLLM keeps the stop token id, nothing after it
            done = SimpleNamespace(
                token_ids=new,
                text="(vLLM's own detokenization, not used)",
                finish_reason="length" if stop is None else "stop",
                stop_reason=None if stop is None else new[-1],
            )
            outs.append(SimpleNamespace(outputs=[done]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from refusal_lens.testing import random_model

    root = tmp_path_factory.mktemp("vllm")
    random_model("llama", n_layers=4, d_model=32).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), 2, -1).save(root / "dir")
    (root / "harmful.json").write_text(json.dumps(HARMFUL[:4]))
    (root / "harmless.json").write_text(json.dumps(HARMLESS[:4]))
    return root


def cli(files, out, *extra):
    return main([
        "evaluate", "--model", str(files / "model"), "--direction", str(files / "dir"),
        "--harmful", str(files / "harmful.json"), "--harmless", str(files / "harmless.json"),
        "--max-new-tokens", "6", "--batch-size", "4", "--n-ce", "2", "--refusal-tokens", "i", "--quiet",
        "--no-report", "--out", str(out), *extra,
    ])  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_missing_vllm_is_one_line_user_error(monkeypatch, files, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(UserError, match="pip install vllm"):
        import_vllm()
    assert cli(files, tmp_path / "e", "--backend", "vllm") == 2
    err = capsys.readouterr().err.strip()
    assert "pip install vllm" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_settings_map_to_sampling_params(fake_vllm, files, tokenizer):
    stops = [2, 7]
    greedy = sampling_params(fake_vllm, GenerationSettings(max_new_tokens=33, seed=5), stops, index=3)
    assert greedy.kwargs == {
        "n": 1, "max_tokens": 33, "stop_token_ids": [2, 7], "seed": 5 * 1_000_003 + 3, "temperature": 0.0, "top_p": 1.0
    }  # fmt: skip
    sampled = sampling_params(fake_vllm, GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9), stops)
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 0)

    model, tok = load_model(files / "model")
    gen = VLLMGenerator({"baseline": str(files / "model")}, tok, model=model, dtype="bfloat16", seed=5,
                        llm_kwargs={"tensor_parallel_size": 2})  # fmt: skip
    gen("baseline", ["how do i bake bread", "write a poem"], GenerationSettings(max_new_tokens=3), progress=False)
    (llm,) = FakeLLM.instances
    assert llm.path == str(files / "model")
    assert llm.kwargs == {
        "tokenizer": str(files / "model"), "dtype": "bfloat16", "seed": 5, "trust_remote_code": False,
        "tensor_parallel_size": 2,
    }  # fmt: skip
    eot = end_of_turn_ids(tok, ChatFormatter(tok), model)
    assert [p.stop_token_ids for p in llm.params] == [eot, eot]
    assert [p.max_tokens for p in llm.params] == [3, 3] and [p.seed for p in llm.params] == [0, 1]
    with pytest.raises(UserError, match="float64"):
        VLLMGenerator({}, tok, dtype="float64")


def test_completions_equal_the_hf_path(fake_vllm, files):
    model, tok = load_model(files / "model")
    prompts = [Prompt("how do i bake bread", "food"), "write a poem about the sea", "what is two plus two"]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    hf = generate(model, tok, prompts, settings=settings, intervention="baseline", prompt_set="harmless",
                  progress=False)  # fmt: skip
    gen = VLLMGenerator({"baseline": str(files / "model")}, tok, model=model)
    vl = gen("baseline", prompts, settings, prompt_set="harmless", progress=False)
    assert [c.to_json() for c in vl] == [c.to_json() for c in hf]
    assert [c.token_ids for c in vl] == [c.token_ids for c in hf]
    assert json.dumps([c.to_json() for c in vl]) == json.dumps([c.to_json() for c in hf])


def test_stop_token_left_out_by_vllm_still_counts(tokenizer):
    settings = GenerationSettings(max_new_tokens=5)
    out = SimpleNamespace(token_ids=[10, 11], finish_reason="stop", stop_reason=2)
    c = _completion(Prompt("x"), out, [2], tokenizer, settings, "baseline", None)
    assert c.finished and c.token_ids == [10, 11, 2] and c.n_tokens == 3
    kept = _completion(Prompt("x"), SimpleNamespace(token_ids=[10, 11, 2], finish_reason="stop", stop_reason=2),
                       [2], tokenizer, settings, "baseline", None)  # fmt: skip
    assert kept.to_json() == c.to_json() and kept.completion == tokenizer.decode([10, 11], skip_special_tokens=True)
    cut = _completion(Prompt("x"), SimpleNamespace(token_ids=[10, 11, 12, 13, 14], finish_reason="length"),
                      [2], tokenizer, settings, "baseline", None)  # fmt: skip
    assert not cut.finished and cut.n_tokens == 5


def test_interventions_under_vllm():
    assert vllm_interventions(["ablate", "orthogonalize"], True, False) == (["ablate", "orthogonalize"], {})
    keep, skipped = vllm_interventions(["ablate", "add", "orthogonalize"], False, False)
    assert keep == ["ablate", "orthogonalize"] and set(skipped) == {"addition"}
    with pytest.raises(UserError, match="activation addition"):
        vllm_interventions(["add"], True, False)
    with pytest.raises(UserError, match="normalises sublayer outputs"):
        vllm_interventions(["ablate"], True, True)
    assert vllm_interventions(["ablate", "orthogonalize"], False, True)[1].keys() == {"ablation"}


def test_evaluate_cli_vllm_backend_matches_hf(fake_vllm, files, tmp_path, capsys):
    assert cli(files, tmp_path / "hf", "--intervention", "ablate,orthogonalize") == 0
    assert cli(files, tmp_path / "vl", "--intervention", "ablate,orthogonalize", "--backend", "vllm") == 0
    # The baseline from the model folder, then ablation and orthogonalized from one orthogonalized copy.
    assert [Path(llm.path).name for llm in FakeLLM.instances] == ["model", "orthogonalized"]
    assert FakeLLM.instances[0].kwargs["gpu_memory_utilization"] == 0.5
    hf, vl = _rows(tmp_path / "hf" / "completions.jsonl"), _rows(tmp_path / "vl" / "completions.jsonl")
    assert vl == hf  # same replies and judgements: hook ablation == the weight edit
    assert {r["intervention"] for r in vl} == {"baseline", "ablation", "orthogonalized"}
    by = {c: [r["completion"] for r in vl if r["intervention"] == c] for c in ("baseline", "ablation")}
    assert by["ablation"] != by["baseline"]  # the direction changes some replies, so the equality above means something
    res = json.loads((tmp_path / "vl" / "results.json").read_text())
    ref = json.loads((tmp_path / "hf" / "results.json").read_text())
    assert res["conditions"]["ablation"]["description"]["generation"] == {
        "backend": "vllm", "checkpoint": "orthogonalized"
    }  # fmt: skip
    assert res["conditions"]["baseline"]["description"]["generation"]["checkpoint"] == "original"
    for cond in ("baseline", "ablation", "orthogonalized"):
        for key in ("harmful", "harmless"):
            assert res["conditions"][cond][key] == ref["conditions"][cond][key]
    # Activation addition: refused by name, listed as skipped under "all".
    capsys.readouterr()
    assert cli(files, tmp_path / "add", "--intervention", "add", "--backend", "vllm") == 2
    assert "activation addition cannot run under vLLM" in capsys.readouterr().err
    assert not (tmp_path / "add").exists()
    assert cli(files, tmp_path / "all", "--backend", "vllm", "--no-kl", "--no-ce") == 0
    res = json.loads((tmp_path / "all" / "results.json").read_text())
    assert set(res["conditions"]) == {"baseline", "ablation", "orthogonalized"}
    assert "activation addition" in res["skipped_conditions"]["addition"]
