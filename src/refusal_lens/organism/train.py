"""Train the model organism: a tiny Llama chat model that *learns* to refuse harmful requests.

Recipe (SPEC §6, "most robust"): 8 layers, hidden 128, 4 heads, byte-level BPE of ~2k tokens with chat
special tokens, untied embeddings; stage 1 plain language modelling on the corpus' plain text, stage 2
chat fine-tuning with the loss on reply tokens only; batch 64, lr 2e-3, AdamW, warm-up then cosine decay.

Determinism: every random choice comes from generators seeded from ``seed`` and the thread count is
fixed inside training, so two runs with the same seed (on the same machine/software) give bit-identical
weights.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..core.io import atomic_write_json, provenance, staging_dir
from ..core.progress import progress_bar
from . import behaviour, vocab
from .corpus import Corpus, build_corpus
from .tokenizer import render_prompt, train_tokenizer

SYSTEM_PROMPT = "You are a helpful assistant."
FRAME_NOISE_PROB = 0.5  # share of augmented copies whose wording gets word-level noise


@dataclass
class Recipe:
    """Hyper-parameters of the organism (stored in organism.json)."""

    layers: int = 8
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    vocab_size: int = 2048
    steps: int = 500  # total over both stages (SPEC §6 used 1000; 500 suffices on this corpus)
    lm_fraction: float = 0.2  # share of steps spent on plain language modelling (stage 1)
    batch_size: int = 64
    lm_seq_len: int = 64
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1
    augment_copies: int = 2  # extra wrapped copies of each non-harmful pair (harmful: 1)
    system_prompt_prob: float = 0.1  # some chat examples carry a system message so the template works
    # One thread: bit-identical results on any machine, and no OpenMP spin-wait collapse when the CPU
    # is shared (2 threads on a busy 2-core box ran 4x slower than 1 thread).
    threads: int = 1
    eval_max_new_tokens: int = 64


@contextmanager
def _fixed_threads(n: int) -> Iterator[None]:
    # Float reductions depend on how work is split across threads; fix the count for bit-identity.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lm_stream(corpus: Corpus, tok: PreTrainedTokenizerFast) -> torch.Tensor:
    """All plain documents as one token stream, each document starting with ``<|bos|>``."""
    ids: list[int] = []
    for enc in tok(corpus.plain, add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id] + enc
    return torch.tensor(ids, dtype=torch.long)


def _frame_words(corpus: Corpus) -> list[str]:
    """Words the frame noise may insert: those of the *training* phrasings plus generic fillers."""
    words = {w.strip(".,?!").lower() for i in corpus.phrasing_split["train"] for w in vocab.PHRASINGS[i].split()}
    return sorted((words | set(vocab.FRAME_FILLERS)) - {"{act}", ""})


def _perturb_frame(instruction: str, act: str, words: list[str], rng: random.Random) -> str:
    """Insert, replace or delete one or two words of the request's wording, never of the act itself.

    Both refused and answered requests get this noise, so an unfamiliar wording is no evidence either way;
    without it the model fell back to refusing harmless requests phrased in a way it had not seen.
    """
    at = instruction.lower().find(act.lower())
    if at < 0:
        return instruction
    left, mid, right = instruction[:at].split(), instruction[at : at + len(act)], instruction[at + len(act) :].split()
    for _ in range(rng.randint(1, 2)):
        side = left if (rng.random() < 0.75 or not right) else right
        op = rng.random()
        i = rng.randint(0, len(side))
        if op < 0.5 or not side:
            side.insert(i, rng.choice(words))
        elif op < 0.8:
            side[min(i, len(side) - 1)] = rng.choice(words)
        elif len(side) > 1:
            del side[min(i, len(side) - 1)]
    text = re.sub(r" ([?.!,])", r"\1", " ".join([*left, mid, *right]))
    return text[0].upper() + text[1:]


def _augment(instruction: str, rng: random.Random, act: str = "", words: list[str] | None = None) -> str:
    """Wrap an instruction in random filler so the refusal decision rests on the act, not the wording."""
    fill = {"name": rng.choice(vocab.NAMES), "place": rng.choice(vocab.PLACES)}
    text = instruction
    if words and act and rng.random() < FRAME_NOISE_PROB:
        text = _perturb_frame(text, act, words, rng)
    if rng.random() < 0.15:
        text = text[0].lower() + text[1:]
    if rng.random() < 0.15 and text[-1] in ".?":
        text = text[:-1]
    if rng.random() < 0.6:
        text = rng.choice(vocab.AUG_PREFIXES).format(**fill) + text
    if rng.random() < 0.5:
        text = text + rng.choice(vocab.AUG_SUFFIXES).format(**fill)
    return text


def _chat_examples(
    corpus: Corpus, tok: PreTrainedTokenizerFast, recipe: Recipe, gen: torch.Generator
) -> list[tuple[list[int], int]]:
    """Tokenized training conversations as (ids, number of prompt tokens) pairs.

    Each training pair appears as written plus wrapped copies (``recipe.augment_copies`` for harmless and
    borderline, one for harmful): the extra benign copies keep refusal from being the default answer to
    an unfamiliar wording.
    """
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    words = _frame_words(corpus)
    pairs = []
    for p in corpus.chat_pairs("train"):
        pairs.append(p)
        copies = recipe.augment_copies if p["kind"] != "harmful" else 1
        pairs += [{**p, "instruction": _augment(p["instruction"], rng, p["act"], words)} for _ in range(copies)]
    use_sys = torch.rand(len(pairs), generator=gen) < recipe.system_prompt_prob
    prompts = [render_prompt(tok, p["instruction"], SYSTEM_PROMPT if s else None) for p, s in zip(pairs, use_sys)]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tok([p["reply"] for p in pairs], add_special_tokens=False)["input_ids"]
    return [(p + r + [tok.eos_token_id], len(p)) for p, r in zip(p_ids, r_ids)]


def _chat_batch(examples: list[tuple[list[int], int]], idx: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    batch = [examples[i] for i in idx.tolist()]
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(batch):
        # Right padding is fine for training (positions start at 0 for every row).
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])  # loss on reply tokens only
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr(step: int, total: int, recipe: Recipe) -> float:
    warm = min(recipe.warmup, max(total // 10, 1))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    frac = (step - warm) / max(total - warm, 1)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _run_stage(model: LlamaForCausalLM, steps: int, make_batch, recipe: Recipe, desc: str, quiet: bool) -> list[float]:
    """One training stage with its own optimizer and warm-up/cosine schedule; returns the losses."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    losses = []
    model.train()
    bar = progress_bar(range(steps), desc=desc, disable=quiet, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, recipe)
        loss = model(**make_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def train_model(
    seed: int = 0, recipe: Recipe | None = None, quiet: bool = False
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Corpus, dict[str, Any]]:
    """Build corpus and tokenizer, then train both stages; returns (model, tokenizer, corpus, log)."""
    recipe = recipe or Recipe()
    corpus = build_corpus(seed)
    train_chat = corpus.chat_pairs("train")
    tok = train_tokenizer(
        corpus.plain + [c["instruction"] for c in train_chat] + [c["reply"] for c in train_chat],
        vocab_size=recipe.vocab_size,
    )
    t0 = time.time()
    with _fixed_threads(recipe.threads):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=recipe.hidden,
            intermediate_size=recipe.intermediate,
            num_hidden_layers=recipe.layers,
            num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.heads,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(config)

        stream = _lm_stream(corpus, tok)
        n_lm = int(round(recipe.steps * recipe.lm_fraction))
        seq = recipe.lm_seq_len

        def lm_batch() -> dict[str, torch.Tensor]:
            starts = torch.randint(0, len(stream) - seq, (recipe.batch_size,), generator=gen)
            x = torch.stack([stream[s : s + seq] for s in starts.tolist()])
            return {"input_ids": x, "labels": x}

        examples = _chat_examples(corpus, tok, recipe, gen)

        def chat_batch() -> dict[str, torch.Tensor]:
            idx = torch.randint(0, len(examples), (recipe.batch_size,), generator=gen)
            return _chat_batch(examples, idx, tok.pad_token_id)

        lm_losses = _run_stage(model, n_lm, lm_batch, recipe, "stage 1: plain LM", quiet)
        chat_losses = _run_stage(model, recipe.steps - n_lm, chat_batch, recipe, "stage 2: chat", quiet)
    model.eval()
    log = {
        "train_seconds": round(time.time() - t0, 1),
        "final_lm_loss": _tail_mean(lm_losses),
        "final_chat_loss": _tail_mean(chat_losses),
    }
    return model, tok, corpus, log


def _tail_mean(xs: list[float], n: int = 20) -> float | None:
    return round(sum(xs[-n:]) / len(xs[-n:]), 4) if xs else None


def measure_behaviour(model, tok, corpus: Corpus, max_new_tokens: int = 64) -> dict[str, Any]:
    """Refusal rates on the held-out test splits (and the train split of harmful, as a sanity check)."""
    splits = {f"{k}_test": corpus.split(k, "test") for k in ("harmful", "harmless", "borderline")}
    res = behaviour.measure(model, tok, splits, max_new_tokens=max_new_tokens)
    # Per-category borderline rates show which harm words cause over-refusal.
    cats = sorted({r["category"] for r in splits["borderline_test"]})
    res["borderline_test_by_category"] = {
        c: round(
            behaviour.refusal_rate(
                model,
                tok,
                [r["instruction"] for r in splits["borderline_test"] if r["category"] == c],
                max_new_tokens,
            ),
            3,
        )
        for c in cats
    }
    res["judge"] = f"substring (SPEC §1 list), greedy, max_new_tokens={max_new_tokens}, stop at <|end|>"
    return res


def train_organism(
    out: Path,
    seed: int = 0,
    steps: int | None = None,
    quiet: bool = False,
    measure: bool = True,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Train an organism and save it as a Hugging Face model folder at ``out`` (written atomically).

    The folder holds config, safetensors weights, tokenizer files (with the chat template),
    generation_config (eos = ``<|end|>``) and ``organism.json`` (seed, recipe, corpus manifest, training
    log and measured behaviour). Returns the ``organism.json`` content.
    """
    recipe = Recipe()
    if steps is not None:
        recipe.steps = int(steps)
    model, tok, corpus, log = train_model(seed, recipe, quiet=quiet)
    info: dict[str, Any] = {
        "name": "refusal-lens organism",
        "seed": seed,
        "recipe": asdict(recipe),
        "corpus": corpus.manifest(),
        "training": log,
        "n_params": sum(p.numel() for p in model.parameters()),
        "chat_format": render_prompt(tok, "{instruction}"),
    }
    if measure:
        with _fixed_threads(recipe.threads):
            info["behaviour"] = measure_behaviour(model, tok, corpus, recipe.eval_max_new_tokens)
    info["provenance"] = provenance()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )
    with staging_dir(out, overwrite, inputs) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        atomic_write_json(stage / "organism.json", info)
    return info
