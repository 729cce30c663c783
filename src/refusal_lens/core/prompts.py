"""Chat formatting: the model's own template, the post-instruction (EOI) tokens, left-padded batches.

The post-instruction tokens are found generically: render the template around a placeholder and take
the tokens after it (Llama-3: ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``).
Batches are left-padded so the EOI tokens are always the last ``n_eoi`` positions.

User text is data, never markup: a chat-template control token typed inside an instruction (``<|im_start|>``)
is tokenized as plain text, and an instruction longer than the context (``tokenizer.model_max_length``, set
from the model by ``load_model``) is cut to fit. Both print one warning per batch saying how many prompts.

Example:
    >>> fmt = ChatFormatter(tokenizer)               # doctest: +SKIP
    >>> batch = fmt.encode(["How do I bake bread?"])  # doctest: +SKIP
    >>> fmt.n_eoi                                    # doctest: +SKIP
    4
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import UserError
from .io import read_text_file

_PLACEHOLDER = "PLACEHOLDERINSTRUCTION"
_NO_LIMIT = 10_000_000  # tokenizers without a known context report ~1e30


def context_limit(tokenizer: object) -> int | None:
    """The most tokens a formatted prompt may have (``model_max_length``), or None when unknown."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int | float) and 0 < limit < _NO_LIMIT else None


def template_hash(template: str | None) -> str | None:
    """sha256 of a chat template, for provenance (the template changes every prompt's tokens)."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


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
    return read_text_file(p, "chat template file")


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
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
        self.control_tokens = sorted((t for t in specials if t), key=len, reverse=True)
        pre, _, post = self.format(_PLACEHOLDER).rpartition(_PLACEHOLDER)
        self._around = (pre, post)
        self._overhead = len(self._ids(pre)) + len(self._ids(post))
        self.limit = context_limit(tokenizer)
        self._cut: set[str] = set()
        self._neutralised: set[str] = set()

    @property
    def template_hash(self) -> str | None:
        return template_hash(self.template)

    def _ids(self, text: str, as_text: bool = False) -> list[int]:
        kwargs = {"split_special_tokens": True} if as_text else {}
        return self.tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]

    def _fit(self, instruction: str) -> str:
        """``instruction`` cut (by tokens) so the formatted prompt fits ``self.limit``."""
        if self.limit is None or len(instruction) < self.limit - self._overhead:  # fewer chars than tokens left
            return instruction
        room = self.limit - self._overhead
        # one token more than fits tells us it is too long; truncating here also keeps long texts cheap
        own = self.tokenizer(
            instruction, add_special_tokens=False, split_special_tokens=True, truncation=True, max_length=room + 1
        )["input_ids"]
        if len(own) <= room:
            return instruction
        self._cut.add(instruction)
        keep = max(room - 8, 1)  # re-tokenizing the cut text inside the template may merge a few tokens
        return self.tokenizer.decode(own[:keep], skip_special_tokens=False)

    def _warn(self, before: tuple[int, int]) -> None:
        cut, neutralised = len(self._cut) - before[0], len(self._neutralised) - before[1]
        if cut:
            warnings.warn(
                f"{cut} prompt(s) are longer than {self.limit} tokens with the template (the model's context or "
                "--max-prompt-tokens) and were cut to fit; pass shorter prompts to avoid this.",
                stacklevel=3,
            )
        if neutralised:
            warnings.warn(
                f"{neutralised} prompt(s) contain chat-template control tokens (e.g. {self.control_tokens[0]!r}); "
                "they were tokenized as plain text, not as control tokens.",
                stacklevel=3,
            )

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
        """Token ids of one formatted prompt, unpadded (the ids :meth:`encode` gives it).

        Control tokens inside ``instruction`` are tokenized as text; a prompt longer than the context is cut.
        """
        instruction = self._fit(instruction)
        if not any(t in instruction for t in self.control_tokens):
            return self._ids(self.format(instruction))
        self._neutralised.add(instruction)
        pre, post = self._around
        if self.system and any(t in self.system for t in self.control_tokens):
            raise UserError("the --system prompt contains chat-template control tokens; remove them.")
        return self._ids(pre) + self._ids(instruction, as_text=True) + self._ids(post)

    def encode(self, instructions: Sequence[str], device: torch.device | str | None = None) -> dict:
        """Tokenize formatted prompts, left-padded, with ``position_ids`` that skip the padding."""
        if len(instructions) == 0:
            raise UserError("the prompt list is empty; give at least one instruction.")
        before = (len(self._cut), len(self._neutralised))
        enc = self.tokenizer.pad({"input_ids": [self.token_ids(i) for i in instructions]}, return_tensors="pt")
        self._warn(before)
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
