"""Optional vLLM generation backend, for evaluating on large prompt sets (``refusal-lens evaluate --backend vllm``).

vLLM runs its own model code, so our PyTorch hooks cannot reach it. Each condition is generated from a
checkpoint that computes it without hooks:

* ``baseline``: the model folder as it is;
* ``ablation`` and ``orthogonalized``: a weight-orthogonalized copy written by
  :func:`~refusal_lens.direction.orthogonalize.orthogonalize_checkpoint` (streaming, into a temporary folder).
  For pre-norm families this is exactly directional ablation by hooks; families with post-sublayer norms are refused;
* ``addition``: refused. Adding ``c·r`` at the input of layer l is a weight edit only where the write before
  it has a bias (Llama-style attention and MLP outputs have none), so no checkpoint computes it in general.

The replies are the same :class:`~refusal_lens.evaluation.generation.Completion` records as the HF path:
prompt token ids from the same chat formatter, the same end-of-turn stop ids, text decoded by our tokenizer
from vLLM's token ids. Greedy decoding maps to ``temperature=0``; with sampling, each prompt is seeded from
(seed, its index), so sampled replies do not depend on vLLM's batching (they differ from the HF backend's).
Judges, KL and CE losses still run on the HF model.

Example:
    >>> gen = VLLMGenerator({"baseline": "path/to/model"}, tokenizer)         # doctest: +SKIP
    >>> gen("baseline", ["How do I bake bread?"], GenerationSettings())       # doctest: +SKIP
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.data import Prompt
from ..core.errors import UserError
from ..core.prompts import ChatFormatter
from .generation import Completion, GenerationSettings, completion_record, cut_at_stop, end_of_turn_ids

VLLM_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
#: Which checkpoint generates each condition: the original model or its orthogonalized copy.
CHECKPOINT_OF = {"baseline": "original", "ablation": "orthogonalized", "orthogonalized": "orthogonalized"}
ADDITION_REFUSED = (
    "activation addition cannot run under vLLM (no hooks, and it is no weight edit without a bias on the "
    "residual writes); use --backend hf"
)


def import_vllm() -> Any:
    """The ``vllm`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError("--backend vllm needs the vllm package: pip install vllm (or use --backend hf).") from None
    return vllm


def vllm_dtype(dtype: str) -> str:
    if dtype not in VLLM_DTYPES:
        raise UserError(f"vLLM cannot run dtype {dtype!r}; choose one of {', '.join(VLLM_DTYPES)} (or --backend hf).")
    return VLLM_DTYPES[dtype]


def sampling_params(vllm: Any, settings: GenerationSettings, stop_ids: Sequence[int], index: int = 0) -> Any:
    """``vllm.SamplingParams`` equivalent to ``settings`` for the prompt at ``index``."""
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {
        "temperature": 0.0, "top_p": 1.0
    }  # fmt: skip
    return vllm.SamplingParams(
        n=1,
        max_tokens=settings.max_new_tokens,
        stop_token_ids=list(stop_ids),
        seed=settings.seed * 1_000_003 + index,
        **sampling,
    )


class VLLMGenerator:
    """Generates each condition's replies with vLLM from the checkpoint ``checkpoints[condition]``.

    One engine is alive at a time: switching to another checkpoint releases the previous engine first.
    ``model`` (optional, the HF model) supplies its generation config's eos ids, as in the HF path.
    ``llm_kwargs`` go to ``vllm.LLM`` (``tensor_parallel_size``, ``gpu_memory_utilization``...).
    Call it like the ``generator`` of :func:`~refusal_lens.evaluation.conditions.evaluate_conditions`.
    """

    def __init__(
        self,
        checkpoints: Mapping[str, str],
        tokenizer: Any,
        *,
        model: nn.Module | None = None,
        dtype: str = "float32",
        seed: int = 0,
        trust_remote_code: bool = False,
        llm_kwargs: Mapping[str, Any] | None = None,
    ):
        self.vllm = import_vllm()
        self.checkpoints = {k: str(v) for k, v in checkpoints.items()}
        self.tokenizer, self.model = tokenizer, model
        self.llm_kwargs = {
            "dtype": vllm_dtype(dtype),
            "seed": seed,
            "trust_remote_code": trust_remote_code,
            **dict(llm_kwargs or {}),
        }
        self._llm: Any = None
        self._path: str | None = None

    def engine(self, condition: str) -> Any:
        path = self.checkpoints.get(condition)
        if path is None:
            raise UserError(f"condition {condition!r} has no checkpoint vLLM can run; use --backend hf for it.")
        if path != self._path:
            self.close()
            self._llm = self.vllm.LLM(model=path, tokenizer=path, **self.llm_kwargs)
            self._path = path
        return self._llm

    def close(self) -> None:
        """Release the current engine (and its GPU memory, as far as vLLM lets go of it)."""
        if self._llm is not None:
            self._llm, self._path = None, None
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __call__(
        self,
        condition: str,
        prompts: Sequence[Prompt | str],
        settings: GenerationSettings | None = None,
        *,
        formatter: ChatFormatter | None = None,
        prompt_set: str | None = None,
        progress: bool = True,
    ) -> list[Completion]:
        settings = settings or GenerationSettings()
        if settings.max_new_tokens < 1 or settings.batch_size < 1:
            raise UserError("max_new_tokens and batch_size must be at least 1.")
        items = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]
        if not items:
            raise UserError(f"the {prompt_set or 'prompt'} list is empty; give at least one instruction.")
        fmt = formatter or ChatFormatter(self.tokenizer)
        stops = end_of_turn_ids(self.tokenizer, fmt, self.model)
        texts = [fmt.format(p.instruction) for p in items]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # fmt.encode's ids, unpadded
        requests = [{"prompt_token_ids": list(row)} for row in ids]
        params = [sampling_params(self.vllm, settings, stops, i) for i in range(len(items))]
        outputs = self.engine(condition).generate(requests, params, use_tqdm=progress)
        return [
            _completion(p, out.outputs[0], stops, self.tokenizer, settings, condition, prompt_set)
            for p, out in zip(items, outputs)
        ]


def _completion(
    prompt: Prompt,
    output: Any,
    stops: Sequence[int],
    tokenizer: Any,
    settings: GenerationSettings,
    condition: str,
    prompt_set: str | None,
) -> Completion:
    ids, finished = cut_at_stop(list(output.token_ids), set(stops))
    if not finished and getattr(output, "finish_reason", None) == "stop":
        finished = True  # stopped at an end-of-turn id that this vLLM version left out of token_ids
        reason = getattr(output, "stop_reason", None)
        if isinstance(reason, int):
            ids.append(reason)
    return completion_record(prompt, ids, finished, stops, tokenizer, settings, condition, prompt_set)


def vllm_interventions(chosen: Sequence[str], explicit: bool, post_norms: bool) -> tuple[list[str], dict[str, str]]:
    """The interventions vLLM can generate, and a reason for each one left out (an error if asked for by name).

    ``explicit``: the user named the interventions (not ``all``); ``post_norms``: the family normalises sublayer
    outputs after the residual writes, so the orthogonalized checkpoint is not ablation there.
    """
    keep, skipped = [], {}
    for item in chosen:
        if item == "add":
            reason = ADDITION_REFUSED
        elif item == "ablate" and post_norms:
            reason = (
                "this family normalises sublayer outputs after the residual writes, so no weight edit equals "
                "hook ablation and vLLM cannot run hooks; use --backend hf"
            )
        else:
            keep.append(item)
            continue
        if explicit:
            raise UserError(f"--intervention {item} with --backend vllm: {reason}.")
        skipped[{"add": "addition", "ablate": "ablation"}[item]] = reason
    return keep, skipped
