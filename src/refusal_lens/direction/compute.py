"""The refusal-direction pipeline and its artifact.

:func:`compute_direction` runs Arditi et al.'s recipe end to end: filter the data by the model's own
behaviour, collect mean activations at the post-instruction tokens, form the difference-in-means
candidates, and select one. :class:`Direction` is the artifact: ``direction.safetensors`` (tensors
``direction [d]`` and ``candidates [n_pos, n_layers, d]``) plus ``direction.json`` (provenance and every
candidate's scores). Loading validates shapes against the model.

Example:
    >>> model, tok = load_model()                                              # doctest: +SKIP
    >>> direction, selection = compute_direction(model, tok, harmful, harmless)  # doctest: +SKIP
    >>> direction.save("out/")                                                 # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.config_args import at_least
from ..core.data import sample
from ..core.errors import UserError
from ..core.io import atomic_save_safetensors, atomic_write_json, load_safetensors, provenance, read_json
from ..core.models import TINY_MODEL_PARAMS, model_provenance, parameter_count
from ..core.prompts import ChatFormatter
from .activations import collect_activations
from .refusal_fit import RefusalScore, barely_refuses, fit_refusal_score
from .selection import SelectionConfig, SelectionResult, fallback_without_induce, select_direction

ARTIFACT_VERSION = 1
MIN_DIRECTION_NORM = 1e-6  # below this a direction is numerically zero (its unit vector is noise or NaN)


@dataclass
class Direction:
    """A selected refusal direction and all candidates it was chosen from."""

    vector: torch.Tensor  # raw (un-normalised) difference in means, [d_model]
    layer: int
    position: int  # negative index from the end of the prompt (-1 = last template token)
    candidates: torch.Tensor | None = None  # [n_pos, n_layers, d_model]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` into ``out_dir`` (atomically)."""
        out = Path(out_dir)
        tensors = {"direction": self.vector.float()}
        if self.candidates is not None:
            tensors["candidates"] = self.candidates.float()
        meta = {"layer": str(self.layer), "position": str(self.position), "format": "refusal-lens-direction"}
        atomic_save_safetensors(tensors, out / "direction.safetensors", meta)
        atomic_write_json(out / "direction.json", {**self.meta, "layer": self.layer, "position": self.position})
        return out / "direction.safetensors"

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Direction:
        """Load from ``direction.safetensors`` (or its folder); with ``model``, validate the shapes."""
        p = Path(path)
        if p.is_dir():
            p = p / "direction.safetensors"
        tensors = load_safetensors(p, "direction file")
        if "direction" not in tensors:
            raise UserError(f"direction file {p} has no 'direction' tensor; was it written by refusal-lens?")
        meta_path = p.with_suffix(".json")
        meta = read_json(meta_path, "direction metadata") if meta_path.is_file() else {}
        vector = tensors["direction"]
        if vector.ndim != 1:
            raise UserError(f"direction file {p}: 'direction' has shape {list(vector.shape)}, expected [d_model].")
        if not torch.isfinite(vector).all():
            raise UserError(f"direction file {p} contains NaN/inf values; re-create it.")
        if float(vector.double().norm()) < MIN_DIRECTION_NORM:
            raise UserError(
                f"direction file {p} has norm {float(vector.double().norm()):.3g} (zero or near zero), so it defines "
                "no direction; re-create it with `refusal-lens direction`."
            )
        d = cls(vector, int(meta.get("layer", -1)), int(meta.get("position", -1)), tensors.get("candidates"), meta)
        if model is not None:
            d.check(model, str(p))
        return d

    def check(self, model: nn.Module, name: str = "direction") -> None:
        adapter = get_adapter(model)
        if self.vector.shape[0] != adapter.d_model:
            raise UserError(
                f"{name} has width {self.vector.shape[0]} but the model's hidden size is {adapter.d_model}; "
                "use a direction computed on this model."
            )
        if self.layer >= adapter.n_layers:
            raise UserError(f"{name} is for layer {self.layer}; this model has {adapter.n_layers} layers.")
        if self.candidates is not None and self.candidates.shape[1] != adapter.n_layers:
            raise UserError(
                f"{name} has candidates for {self.candidates.shape[1]} layers; this model has {adapter.n_layers}."
            )


class NoDirectionError(UserError):
    """No candidate passed the selection filters; the message is the selection's explanation."""


@dataclass
class DirectionResult:
    """What :func:`compute_direction` found.

    ``result.direction`` is the selected direction; when no candidate passed the filters, reading it raises
    :class:`NoDirectionError` with the selection's explanation (which filter removed what, the closest
    candidates). Check ``result.found`` first to handle that case; ``result.chosen`` is the direction or None.
    """

    chosen: Direction | None  # None when no candidate passed the selection filters
    selection: SelectionResult | None  # None when --layer/--position were given
    candidates: torch.Tensor  # [n_pos, n_layers, d_model]
    info: dict[str, Any]  # provenance, data counts, refusal tokens

    @property
    def found(self) -> bool:
        return self.chosen is not None

    @property
    def direction(self) -> Direction:
        if self.chosen is None:
            why = self.selection.explanation if self.selection is not None else "no candidate was chosen"
            raise NoDirectionError(
                f"no refusal direction was selected, so result.direction does not exist (check result.found):\n{why}"
            )
        return self.chosen


@dataclass
class DirectionConfig:
    n_train: int = field(default=128, metadata=at_least(1))
    """Harmful and harmless training prompts each (paper: 128)."""
    n_val: int | None = field(default=None, metadata=at_least(1))
    """Harmful and harmless validation prompts each. Default: the paper's 32, or up to 128 for tiny models (under 50M
    parameters, such as the organism), where the extra prompts cost seconds and steady the choice."""
    filter_data: bool = True
    """Keep only harmful prompts the model refuses and harmless ones it answers (refusal score >0 / <0)."""
    batch_size: int = field(default=32, metadata=at_least(1))
    """Prompts per forward pass."""
    seed: int = 0
    """Seed for sampling prompts."""
    layer: int | None = None
    """Skip selection and use this layer (with --position)."""
    position: int | None = None
    """Skip selection and use this post-instruction position (negative, -1 = last token)."""
    fallback_drop_induce: bool = False
    """If no candidate passes, use the best one that fails only the induce filter (flagged in the output)."""
    refusal_score: str = "auto"
    """paper (log-odds of refusal tokens), contrast (refusal vs compliance tokens) or auto (contrast when the
    refusal tokens also open harmless answers); fitted on the model's own replies, reported in direction.json."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)


PAPER_N_VAL, TINY_MODEL_N_VAL = 32, 128


def resolve_n_val(cfg: DirectionConfig, model: nn.Module) -> DirectionConfig:
    """The config with ``n_val`` filled in when it was left to the default.

    Extra validation prompts steady the choice (the KL filter's mean is heavy-tailed over prompts): on the organism,
    32 / 64 / 128 per set choose the same candidate, in 80 / 97 / 100 % of bootstrap resamples, for 3.6 / 4.9 / 6.6
    CPU-s (``scripts/validation_size_check.py``). On larger models each extra harmless prompt costs KL, induce and
    bypass rows for every surviving candidate, so they keep the paper's 32.
    """
    if cfg.n_val is not None:
        return cfg
    tiny = parameter_count(model) < TINY_MODEL_PARAMS
    return replace(cfg, n_val=TINY_MODEL_N_VAL if tiny else PAPER_N_VAL)


def _split_val(items: Sequence[str], n_train: int, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """Carve a validation set out of one list when no separate validation file is given."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_n = min(n_val, max(1, len(items) // 5))
    val = [items[i] for i in sorted(order[:val_n])]
    train = [items[i] for i in sorted(order[val_n:])]
    return sample(train, n_train, seed), val


def _carved(source: Any, pool: int, n_val: int, seed: int) -> dict[str, Any]:
    """Provenance of a validation set carved out of the training prompts (no separate validation file)."""
    return {
        "carved_from": source if source is not None else "the training prompts given",
        "n_prompts": n_val,
        "of": pool,
        "seed": seed,
        "how": "seeded shuffle of the training prompts; the first min(n_val, n/5) are validation, "
        "the training sample is drawn from the rest (disjoint)",
    }


def _behaviour_filter(score: RefusalScore, refuse: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Which prompts count: harmful ones the model refuses (score > 0), harmless ones it answers."""
    return lambda logits: (score(logits) > 0) == refuse


def compute_direction(
    model: nn.Module,
    tokenizer: object,
    harmful: Sequence[str],
    harmless: Sequence[str],
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    config: DirectionConfig | None = None,
    refusal_tokens: Sequence[int] | None = None,
    system: str | None = None,
    chat_template: str | None = None,
    data_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> DirectionResult:
    """Extract and select the refusal direction.

    When no candidate passes the selection filters, ``result.found`` is False and reading
    ``result.direction`` raises :class:`NoDirectionError` with ``result.selection.explanation``; the
    candidates and their scores are kept either way.
    """
    cfg = resolve_n_val(config or DirectionConfig(), model)
    for name, items in (("harmful", harmful), ("harmless", harmless)):
        if not items:
            raise UserError(f"the {name} prompt list is empty; give at least one instruction.")
    fmt = ChatFormatter(tokenizer, system=system, chat_template=chat_template)
    adapter = get_adapter(model)
    if cfg.layer is not None:  # check a manual choice before any forward pass
        adapter.check_layer(cfg.layer)
    data = dict(data_info or {})
    if harmful_val is None:
        pool = len(harmful)
        harmful, harmful_val = _split_val(harmful, cfg.n_train, cfg.n_val, cfg.seed)
        data["harmful_val"] = _carved(data.get("harmful"), pool, len(harmful_val), cfg.seed)
    if harmless_val is None:
        pool = len(harmless)
        harmless, harmless_val = _split_val(harmless, cfg.n_train, cfg.n_val, cfg.seed)
        data["harmless_val"] = _carved(data.get("harmless"), pool, len(harmless_val), cfg.seed)
    sets = {
        "harmful_train": sample(harmful, cfg.n_train, cfg.seed),
        "harmless_train": sample(harmless, cfg.n_train, cfg.seed),
        "harmful_val": sample(harmful_val, cfg.n_val, cfg.seed),
        "harmless_val": sample(harmless_val, cfg.n_val, cfg.seed),
    }
    if refusal_tokens:
        names = [tokenizer.decode([i]) for i in refusal_tokens]
        score = RefusalScore("paper", list(refusal_tokens), refusal_tokens=names, why="--refusal-tokens given")
    else:
        score = fit_refusal_score(model, fmt, sets["harmful_train"], sets["harmless_train"], cfg.refusal_score)
        problem = barely_refuses(score)
        if problem:
            raise UserError(problem)
    if progress:
        print(score.describe())
    ids = score.refusal_ids
    counts_before = {k: len(v) for k, v in sets.items()}
    means: dict[str, torch.Tensor] = {}
    for key in sets:  # one forward per prompt: the training sets' activations and the data filter together
        refuse = key.startswith("harmful")
        train = key.endswith("train")
        if not (train or cfg.filter_data):
            continue
        keep = _behaviour_filter(score, refuse) if cfg.filter_data else None
        found = collect_activations(
            model, fmt, sets[key], None if train else 1, cfg.batch_size, keep, key.split("_")[0], progress and train
        )
        if cfg.filter_data and len(found.kept) < 2:
            raise UserError(
                f"by the refusal score ({score.method}: {score.refusal_tokens}) the model "
                f"{'refuses' if refuse else 'answers'} only {len(found.kept)} of {len(sets[key])} "
                f"{key.replace('_', ' ')} prompts, too few to estimate a direction; try "
                "--refusal-score contrast, --refusal-tokens, or --no-filter-data."
            )
        sets[key] = [sets[key][i] for i in found.kept]
        if train:
            means[key] = found.mean
    mean_harmful, mean_harmless = means["harmful_train"], means["harmless_train"]
    candidates = (mean_harmful - mean_harmless)[:, : adapter.n_layers]  # float64 [n_pos, L, d]
    tokenizer_tokens = [tokenizer.decode([i]) for i in ids]
    info: dict[str, Any] = provenance(
        artifact_version=ARTIFACT_VERSION,
        **model_provenance(model),
        family=adapter.family,
        n_layers=adapter.n_layers,
        d_model=adapter.d_model,
        eoi_text=fmt.eoi_text,
        eoi_tokens=tokenizer.convert_ids_to_tokens(fmt.eoi_ids),
        system_prompt=system,
        chat_template_sha256=fmt.template_hash,
        max_prompt_tokens=fmt.limit,
        refusal_token_ids=ids,
        refusal_tokens=tokenizer_tokens,
        refusal_score=score.to_json(),
        data=data,
        counts_sampled=counts_before,
        counts_after_filter={k: len(v) for k, v in sets.items()},
        config={k: v for k, v in asdict(cfg).items() if k != "selection"},
        mean_norm_harmful_by_layer=mean_harmful[-1].norm(dim=-1).tolist(),
    )
    if cfg.layer is not None:
        pos = -1 if cfg.position is None else cfg.position
        if not -fmt.n_eoi <= pos < 0:
            raise UserError(f"--position {pos} is out of range; use -1..-{fmt.n_eoi} (post-instruction tokens).")
        vec = candidates[pos, cfg.layer].float()
        chosen = Direction(vec, cfg.layer, pos, candidates.float(), {**info, "selected_by": "user"})
        return DirectionResult(chosen, None, candidates.float(), info)
    selection = select_direction(
        model, fmt, candidates, sets["harmful_val"], sets["harmless_val"], ids, cfg.selection, progress, score
    )
    info["selection"] = selection.to_json()
    c = selection.chosen
    if c is None and cfg.fallback_drop_induce:
        c = fallback_without_induce(selection)
        if c is not None:
            selection.explanation += (
                f"\nFALLBACK: using position {c.position}, layer {c.layer} (bypass {c.bypass:.3f}, induce "
                f"{c.induce:.3f}, kl {c.kl:.4f}), which fails only the induce filter."
            )
            info["selection"] = selection.to_json() | {"fallback": "induce filter dropped"}
    if c is None:
        return DirectionResult(None, selection, candidates.float(), info)
    vec = candidates[c.position, c.layer].float()
    how = "selection" if selection.chosen is not None else "fallback: induce filter dropped"
    chosen = Direction(vec, c.layer, c.position, candidates.float(), {**info, "selected_by": how})
    return DirectionResult(chosen, selection, candidates.float(), info)
