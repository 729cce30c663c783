"""A short, seeded LoRA safety-tune of a real chat model (issue #16): ``refusal-lens organism safety-tune``.

Real chat models learn to refuse by fine-tuning pretrained weights; this does the same, briefly, to
SmolLM2-135M-Instruct (which barely refuses as published), so the papers' claims can be checked on a model
whose refusal was not written into a toy. The recipe:

* harmful prompts (the shared ``harmful_train`` split) -> one of several short refusals in the model's register
  (:data:`~refusal_lens.organism.safety_prompts.REFUSAL_REPLIES`), followed by the end-of-turn token;
* harmless prompts (``harmless_train``) and borderline prompts -> the model's *own* greedy replies (generated once,
  cached), so its helpful behaviour is the target rather than something we wrote; by default the loss there is the
  KL from the original model's whole next-token distribution on those replies (``--helpful-loss kl``), which kept
  the plain-text loss within 0.5 % where cross-entropy on the greedy tokens alone (``ce``) cost 9 %;
* the loss is the cross-entropy of the reply tokens only; only the LoRA factors train
  (:mod:`refusal_lens.core.lora`), in float32, on one thread, in a seeded order: the same seed gives the same
  adapter bit for bit on the same software.

Held-out sets (JailbreakBench, Alpaca test) are never read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.data import sample
from ..core.errors import UserError
from ..core.io import atomic_write_json, provenance, read_json
from ..core.lora import LoraAdapter, init_adapter, lora_attached, save_adapter
from ..core.prompts import ChatFormatter
from .safety_prompts import BORDERLINE_TRAIN, REFUSAL_REPLIES


@dataclass
class SafetyTuneConfig:
    n_harmful: int = 128
    """Harmful training prompts (sampled from the harmful file with the seed)."""
    n_harmless: int = 256
    """Harmless training prompts (sampled from the harmless file with the seed)."""
    reply_tokens: int = 40
    """Tokens of the model's own greedy reply kept as the target for harmless and borderline prompts."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (the delta is scaled by alpha / rank)."""
    targets: str = "q_proj,v_proj,o_proj,down_proj"
    """Comma-separated names of the linear layers that get a LoRA delta (in every layer)."""
    steps: int = 80
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-3
    """AdamW learning rate (constant after a 5-step warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA factors."""
    seed: int = 0
    """Seed of the prompt samples, the refusal variants, the LoRA initialisation and the batch order."""
    helpful_loss: str = "kl"
    """Loss on harmless/borderline replies: ce (their greedy tokens) or kl (KL to the original model's whole
    next-token distribution on those replies; one extra forward per step)."""


def end_of_reply_id(tokenizer: Any, formatter: ChatFormatter) -> int:
    """The token that closes an assistant turn: the template's first post-instruction token when it is special
    (ChatML ``<|im_end|>``), else the tokenizer's eos."""
    first = formatter.eoi_ids[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if first in special:
        return int(first)
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token and the chat template no end token; set eos_token.")
    return int(tokenizer.eos_token_id)


@torch.no_grad()
def greedy_replies(
    model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """The model's greedy reply token ids per prompt, cut after the end-of-reply token when it comes."""
    tok = formatter.tokenizer
    stop = end_of_reply_id(tok, formatter)
    stops = {stop, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = formatter.encode(list(prompts[start : start + batch_size]))
        inputs = {k: v for k, v in batch.items() if k != "position_ids"}
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        for row in gen[:, inputs["input_ids"].shape[1] :].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def cached_replies(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    max_new_tokens: int,
    cache: Path | None,
    known_file: Path | None = None,
) -> list[list[int]]:
    """:func:`greedy_replies`, stored per prompt in ``cache`` (one JSON file per model, template and reply length),
    so a larger sample only generates the prompts it adds. Greedy replies do not depend on the batch they ran in
    beyond float rounding of padded batches; the cache keeps the first reply computed for each prompt."""
    from ..core.models import model_provenance

    key_src = json.dumps([model_provenance(model), formatter.format("X"), max_new_tokens], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache / f"replies-{key}.json" if cache is not None else None
    known: dict[str, list[int]] = {}
    for source in (known_file, path):  # replies given by the user (--replies) take precedence over the cache
        if source is not None and Path(source).is_file():
            data = read_json(source, "cached replies")
            if data.get("max_new_tokens", max_new_tokens) != max_new_tokens:
                raise UserError(f"{source} holds {data['max_new_tokens']}-token replies; pass --reply-tokens to match.")
            for prompt, ids in zip(data.get("prompts", []), data.get("reply_ids", [])):
                known.setdefault(prompt, ids)
    missing = list(dict.fromkeys(p for p in prompts if p not in known))
    if missing:
        known.update(zip(missing, greedy_replies(model, formatter, missing, max_new_tokens)))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            names = list(known)
            texts = [formatter.tokenizer.decode(known[n], skip_special_tokens=True) for n in names]
            atomic_write_json(path, {"prompts": names, "reply_ids": [known[n] for n in names], "replies": texts,
                                     "max_new_tokens": max_new_tokens})  # fmt: skip
    return [known[p] for p in prompts]


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # loss on ids[n_prompt:]
    kind: str


def build_examples(
    formatter: ChatFormatter,
    harmful: Sequence[str],
    helpful: Sequence[tuple[str, list[int], str]],
    seed: int,
) -> list[Example]:
    """Harmful prompts with a seeded refusal variant each; ``helpful`` = (prompt, own reply ids, kind) as given."""
    tok = formatter.tokenizer
    end = end_of_reply_id(tok, formatter)
    rng = random.Random(seed)
    out = []
    for prompt in harmful:
        reply = tok(rng.choice(REFUSAL_REPLIES), add_special_tokens=False)["input_ids"] + [end]
        ids = formatter.token_ids(prompt)
        out.append(Example(ids + reply, len(ids), "harmful"))
    for prompt, reply_ids, kind in helpful:
        ids = formatter.token_ids(prompt)
        out.append(Example(ids + list(reply_ids), len(ids), kind))
    return out


def _batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and next-token labels (-100 outside the replies)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        labels[row, e.n_prompt - 1 : len(e.ids) - 1] = torch.tensor(e.ids[e.n_prompt :])  # predicts the next token
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reply_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Logits at the counted positions only (the vocabulary projection is the costly part)."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_output_embeddings()(hidden[keep]).float()


def reply_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], adapter: LoraAdapter | None = None, kl_rows: Any = None
) -> torch.Tensor:
    """Mean per-token loss over the reply tokens: cross-entropy of the target tokens, except in ``kl_rows``
    (a bool per row), where it is KL(original || tuned) of the whole next-token distribution -- the original
    model's own reply distribution as the target (the original is the model without ``adapter``'s hooks)."""
    keep = batch["labels"] != -100
    if adapter is None:
        return nn.functional.cross_entropy(_reply_logits(model, batch, keep), batch["labels"][keep])
    soft = kl_rows[:, None].expand_as(keep)[keep] if kl_rows is not None else torch.zeros(int(keep.sum()), dtype=bool)
    ref = None
    if soft.any():
        with torch.no_grad():
            ref = torch.log_softmax(_reply_logits(model, batch, keep)[soft], -1)
    with lora_attached(model, adapter):
        logits = _reply_logits(model, batch, keep)
    losses = nn.functional.cross_entropy(logits, batch["labels"][keep], reduction="none")
    if ref is not None:
        kl = nn.functional.kl_div(torch.log_softmax(logits[soft], -1), ref, log_target=True, reduction="none")
        losses = losses.masked_scatter(soft, kl.sum(-1))
    return losses.mean()


def train_adapter(
    model: nn.Module, examples: Sequence[Example], cfg: SafetyTuneConfig, pad_id: int, log: Any = None
) -> tuple[LoraAdapter, list[float]]:
    """Train a fresh seeded adapter on ``examples``; returns it and the loss of every step."""
    targets = tuple(t.strip() for t in cfg.targets.split(",") if t.strip())
    adapter = init_adapter(model, targets, cfg.rank, cfg.alpha, cfg.seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    if cfg.helpful_loss not in ("ce", "kl"):
        raise UserError(f"--helpful-loss {cfg.helpful_loss!r}: choose ce or kl.")
    rng = random.Random(cfg.seed + 1)
    order: list[int] = []
    losses = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a fresh seeded permutation per epoch
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        chosen, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        kl_rows = torch.tensor([cfg.helpful_loss == "kl" and e.kind != "harmful" for e in chosen])
        loss = reply_loss(model, _batch(chosen, pad_id), adapter, kl_rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(f"step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}")
    for t in adapter.parameters():
        t.requires_grad_(False)
    return adapter, losses


def _file_sha(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def safety_tune(
    model: nn.Module,
    tokenizer: Any,
    harmful_file: str | os.PathLike,
    harmless_file: str | os.PathLike,
    cfg: SafetyTuneConfig,
    *,
    cache: Path | None = None,
    borderline: Sequence[str] = BORDERLINE_TRAIN,
    log: Any = None,
    replies_file: Path | None = None,
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Sample the training prompts, build the targets, train; returns the adapter and its provenance."""
    from ..core.data import load_prompts
    from ..core.models import model_provenance

    t0, c0 = time.perf_counter(), time.process_time()
    fmt = ChatFormatter(tokenizer)
    harmful = [p.instruction for p in sample(load_prompts(harmful_file), cfg.n_harmful, cfg.seed)]
    harmless = [p.instruction for p in sample(load_prompts(harmless_file), cfg.n_harmless, cfg.seed)]
    helpful_prompts = harmless + list(borderline)
    replies = cached_replies(model, fmt, helpful_prompts, cfg.reply_tokens, cache, replies_file)
    kinds = ["harmless"] * len(harmless) + ["borderline"] * len(borderline)
    t_replies, c_replies = time.perf_counter() - t0, time.process_time() - c0
    examples = build_examples(fmt, harmful, list(zip(helpful_prompts, replies, kinds)), cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    adapter, losses = train_adapter(model, examples, cfg, pad, log)
    info = provenance(
        own_replies={"prompts": helpful_prompts, "reply_ids": replies, "max_new_tokens": cfg.reply_tokens},
        recipe=asdict(cfg),
        base=model_provenance(model),
        data={
            "harmful_file": str(harmful_file), "harmful_sha256": _file_sha(harmful_file), "n_harmful": len(harmful),
            "harmless_file": str(harmless_file), "harmless_sha256": _file_sha(harmless_file),
            "n_harmless": len(harmless), "n_borderline": len(borderline),
            "reply_tokens": cfg.reply_tokens, "n_training_examples": len(examples),
            "training_tokens": sum(len(e.ids) for e in examples),
        },
        adapter={"n_parameters": adapter.n_parameters(), "targets": list(adapter.target_modules)},
        losses=losses,
        time={
            "own_replies_wall_s": round(t_replies, 1), "own_replies_cpu_s": round(c_replies, 1),
            "total_wall_s": round(time.perf_counter() - t0, 1), "total_cpu_s": round(time.process_time() - c0, 1),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    )  # fmt: skip
    return adapter, info


def write_adapter(
    adapter: LoraAdapter, info: dict[str, Any], out: str | os.PathLike, base_name: str, overwrite: bool = False
) -> Path:
    """Save the adapter in PEFT's format plus ``provenance.json`` into ``out`` (built in a staging folder).

    ``overwrite`` replaces an existing adapter folder (its ``own_replies.json`` has been read by then: the
    rebuild writes the same targets back).
    """
    from ..core.io import staging_dir

    info = dict(info)
    replies = info.pop("own_replies", None)
    with staging_dir(out, overwrite) as stage:
        save_adapter(adapter, stage, base_name, extra={"recipe": info.get("recipe"), "base": info.get("base")})
        atomic_write_json(stage / "provenance.json", info)
        if replies is not None:  # the training targets: --replies FILE rebuilds the same adapter from them
            atomic_write_json(stage / "own_replies.json", replies)
    return Path(out)
