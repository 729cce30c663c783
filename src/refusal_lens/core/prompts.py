"""Chat formatting: the model's own template, the post-instruction (EOI) tokens, left-padded batches.

The post-instruction tokens are found generically: render the template around a placeholder and take
the tokens after it (Llama-3: ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``).
Batches are left-padded so the EOI tokens are always the last ``n_eoi`` positions.

Example:
    >>> fmt = ChatFormatter(tokenizer)               # doctest: +SKIP
    >>> batch = fmt.encode(["How do I bake bread?"])  # doctest: +SKIP
    >>> fmt.n_eoi                                    # doctest: +SKIP
    4
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import UserError

_PLACEHOLDER = "PLACEHOLDERINSTRUCTION"


BUILTIN_TEMPLATES = {"gemma": Path(__file__).parent / "templates" / "gemma.jinja"}
"""Chat templates shipped with refusal-lens, for base models whose tokenizer has none (``--chat-template gemma``)."""


def read_chat_template(path: str | os.PathLike) -> str:
    """A Jinja chat template from a file, or a shipped one by name (:data:`BUILTIN_TEMPLATES`)."""
    p = Path(path)
    if not p.exists() and str(path) in BUILTIN_TEMPLATES:
        p = BUILTIN_TEMPLATES[str(path)]
    if not p.is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        raise UserError(f"chat template file {p} does not exist; pass a Jinja template file or a shipped one: {names}.")
    return p.read_text(encoding="utf-8")


class ChatFormatter:
    """Formats instructions with a tokenizer's chat template and tokenizes them left-padded."""

    def __init__(self, tokenizer: object, system: str | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            name = getattr(tokenizer, "name_or_path", "the tokenizer")
            raise UserError(
                f"tokenizer of {name} has no chat template; pass --chat-template FILE (a Jinja chat template)."
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eoi_text, self.eoi_ids = self._find_eoi()
        self.n_eoi = len(self.eoi_ids)

    def messages(self, instruction: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": instruction}]

    def format(self, instruction: str) -> str:
        """The full prompt text, ending with the generation prompt."""
        try:
            return self.tokenizer.apply_chat_template(
                self.messages(instruction),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:
            raise UserError(f"the chat template failed to render ({exc}); check --chat-template/--system.") from None

    def _find_eoi(self) -> tuple[str, list[int]]:
        text = self.format(_PLACEHOLDER)
        if _PLACEHOLDER not in text:
            raise UserError("the chat template drops the user's message; check --chat-template.")
        suffix = text[text.rindex(_PLACEHOLDER) + len(_PLACEHOLDER) :]
        full = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = self.tokenizer(text[: len(text) - len(suffix)], add_special_tokens=False)["input_ids"]
        # Tokens after the longest common prefix belong to the template's suffix.
        common = 0
        while common < min(len(full), len(prefix)) and full[common] == prefix[common]:
            common += 1
        eoi = full[common:]
        if not eoi:
            raise UserError("the chat template adds no tokens after the instruction; check --chat-template.")
        return suffix, eoi

    def token_ids(self, instruction: str) -> list[int]:
        """Token ids of one formatted prompt, unpadded (the ids :meth:`encode` gives it)."""
        return self.tokenizer(self.format(instruction), add_special_tokens=False)["input_ids"]

    def encode(self, instructions: Sequence[str], device: torch.device | str | None = None) -> dict:
        """Tokenize formatted prompts, left-padded, with ``position_ids`` that skip the padding."""
        if len(instructions) == 0:
            raise UserError("the prompt list is empty; give at least one instruction.")
        enc = self.tokenizer(
            [self.format(i) for i in instructions],
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch["position_ids"] = position_ids(batch["attention_mask"])
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def batches(
        self, instructions: Sequence[str], batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[dict]:
        for start in range(0, len(instructions), batch_size):
            yield self.encode(instructions[start : start + batch_size], device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
