"""Tiny random-init models of every supported family and a toy chat tokenizer, built offline.

Used by the test suite and the benchmarks; handy for users who want to try an API without a download.

Example:
    >>> model = random_model("qwen2", n_layers=2, d_model=32)  # doctest: +SKIP
    >>> tok = toy_tokenizer()                                   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from .organism.tokenizer import CHAT_TEMPLATE  # the organism's template (optional system turn)

FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2",
    "qwen2_moe", "mixtral", "qwen3_moe", "granite", "gemma3_text",
)  # fmt: skip

_TEXT = (
    "how do i bake bread at home . i am sorry , but i cannot help with that request . "
    "write a poem about the sea . as an ai i can not assist . sure , here is a short story . "
    "explain how plants grow . give me three tips for travel . what is two plus two ? "
)


def toy_tokenizer(vocab_size: int = 300, chat_template: str | None = CHAT_TEMPLATE) -> object:
    """A byte-level BPE tokenizer with the organism's chat tokens, trained in milliseconds on a toy text.

    ``chat_template=None`` gives a tokenizer without a chat template (to test that error path).
    """
    from .organism.tokenizer import train_tokenizer

    tok = train_tokenizer([_TEXT] * 4, vocab_size)
    tok.chat_template = chat_template
    return tok


def _config(family: str, n_layers: int, d_model: int, n_heads: int, vocab: int, tied: bool | None) -> object:
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads, **ids)
    llama_like = dict(common, intermediate_size=2 * d_model, num_key_value_heads=max(1, n_heads // 2))
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=256, **ids)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**common, intermediate_size=2 * d_model, max_position_embeddings=256)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **llama_like, moe_intermediate_size=d_model, shared_expert_intermediate_size=d_model,
            num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **llama_like, head_dim=d_model // n_heads, moe_intermediate_size=d_model, num_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**llama_like, head_dim=d_model // n_heads, query_pre_attn_scalar=d_model // n_heads)
    elif family == "granite":
        cfg = tf.GraniteConfig(**llama_like, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**llama_like, head_dim=d_model // n_heads, query_pre_attn_scalar=d_model // n_heads)
    else:
        config_cls = {
            "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config, "olmo2": tf.Olmo2Config,
        }[family]  # fmt: skip
        extra = {"head_dim": d_model // n_heads} if family in ("qwen3", "gemma") else {}
        cfg = config_cls(**llama_like, **extra)
    if tied is not None:
        cfg.tie_word_embeddings = tied
    return cfg


def random_model(
    family: str = "llama",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    vocab: int = 300,
    tied: bool | None = None,
    seed: int = 0,
    bias: bool = True,
) -> nn.Module:
    """A random-init causal LM of ``family`` (see :data:`FAMILIES`), float32, eval mode.

    ``bias=True`` gives residual-writing biases random values too (they are zero-initialised), so tests of
    bias orthogonalization cannot pass by accident.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, n_layers, d_model, n_heads, vocab, tied))
    model.eval()
    model.requires_grad_(False)
    if bias:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))
    return model
