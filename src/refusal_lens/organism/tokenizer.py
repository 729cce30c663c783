"""Byte-level BPE tokenizer with chat special tokens, wrapped as a ``PreTrainedTokenizerFast``.

Rendering ``[{"role": "user", "content": X}]`` with the generation prompt gives
``<|bos|><|user|>\\n{X}<|end|>\\n<|assistant|>\\n``. Special tokens are split out before BPE and a newline
is always its own pre-token, so the post-instruction tokens ``<|end|> \\n <|assistant|> \\n`` are the same
four ids whatever the instruction is. The tokenizer adds no special tokens by itself (the chat template
contains ``<|bos|>``), so templated text must be tokenized with ``add_special_tokens=False`` or
directly through ``apply_chat_template``; that also means no doubled BOS if someone forgets.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, USER, ASSISTANT, SYSTEM, END, PAD = (
    "<|bos|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|pad|>",
)
SPECIAL_TOKENS = [PAD, BOS, END, USER, ASSISTANT, SYSTEM]
DEFAULT_VOCAB_SIZE = 2048

# Jinja chat template: optional system message, any number of turns, optional generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with the chat template and special tokens.

    The BPE trainer is deterministic for a fixed input order, so the same corpus gives the same vocab.
    """
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word of an instruction must tokenize the same way whether it
    # follows a newline in the template or starts a plain document.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` with the chat tokens, template and left padding."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        padding_side="left",  # left padding keeps the post-instruction tokens at the last positions
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def render_prompt(tokenizer: PreTrainedTokenizerFast, instruction: str, system: str | None = None) -> str:
    """The templated prompt string for one user instruction, ending with the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
