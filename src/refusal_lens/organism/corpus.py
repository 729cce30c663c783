"""The organism's corpus: labelled instructions, chat replies and plain text, deterministic from a seed.

Design (why it looks like this):

* Harmful, harmless and borderline instructions are all built from the *same* request phrasings
  (``vocab.PHRASINGS``) filled with an act, so refusal has to be learned from content words.
* Splits are by template: each phrasing belongs to exactly one of train/val/test, and borderline
  scenarios are held out as a whole as well, so test prompts use wordings never seen in training.
* Helpful replies restate the request before answering (no fixed opener such as "Sure! Here is"),
  which SPEC §6 found gives a clean, single refusal direction.
* Plain text mentions harm words in neutral contexts (news, fiction, history) for stage-1 language
  modelling and for SAE "pretraining" data.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..core.errors import UserError
from . import vocab

KINDS = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")

# Number of phrasings held out for validation and test (the rest are training phrasings).
N_VAL_PHRASINGS = 6
N_TEST_PHRASINGS = 10
# Borderline scenarios held out per category (val, test); the rest are trained on.
N_VAL_SCENARIOS = 1
N_TEST_SCENARIOS = 2
# Caps on the evaluation splits (sampled deterministically) so evaluation stays cheap.
EVAL_CAPS = {"val": 128, "test": 320}
N_PLAIN_DOCS = 3000
N_ARITH = 300


@dataclass
class Corpus:
    """Everything the organism is trained and evaluated on.

    ``prompts[kind][split]`` holds records ``{"instruction", "category", "template", "act"}``;
    ``chat`` holds ``{"act", "instruction", "reply", "kind", "category", "split", "template"}`` for every prompt
    (train pairs are the fine-tuning data; all pairs are usable as SAE chat data); ``plain`` holds
    pretraining-style documents without any chat template.
    """

    seed: int
    prompts: dict[str, dict[str, list[dict[str, str]]]]
    chat: list[dict[str, str]]
    plain: list[str]
    phrasing_split: dict[str, list[int]] = field(default_factory=dict)

    def split(self, kind: str, split: str) -> list[dict[str, str]]:
        """Records of one kind and split (see :func:`load_split` for the checked public version)."""
        return self.prompts[kind][split]

    def chat_pairs(self, split: str | None = None) -> list[dict[str, str]]:
        """(instruction, reply) records, optionally restricted to one split."""
        return [c for c in self.chat if split is None or c["split"] == split]

    def content_hash(self) -> str:
        """SHA-256 of the full corpus content; identical seeds give identical hashes."""
        blob = json.dumps({"prompts": self.prompts, "chat": self.chat, "plain": self.plain}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def manifest(self) -> dict[str, Any]:
        """Counts per kind/split, category lists and the content hash (stored in organism.json)."""
        counts = {k: {s: len(v) for s, v in d.items()} for k, d in self.prompts.items()}
        cats = {k: sorted({r["category"] for s in d.values() for r in s}) for k, d in self.prompts.items()}
        return {
            "seed": self.seed,
            "counts": counts,
            "categories": cats,
            "chat_pairs": {s: len(self.chat_pairs(s)) for s in SPLITS},
            "plain_docs": len(self.plain),
            "phrasing_split": self.phrasing_split,
            "sha256": self.content_hash(),
        }


def _split_indices(n: int, n_val: int, n_test: int, rng: random.Random) -> dict[str, list[int]]:
    idx = list(range(n))
    rng.shuffle(idx)
    return {
        "test": sorted(idx[:n_test]),
        "val": sorted(idx[n_test : n_test + n_val]),
        "train": sorted(idx[n_test + n_val :]),
    }


def _cap(records: list[dict[str, str]], cap: int, rng: random.Random) -> list[dict[str, str]]:
    # Sample without replacement but keep a stable order, so the split reads in template order.
    if len(records) <= cap:
        return records
    keep = sorted(rng.sample(range(len(records)), cap))
    return [records[i] for i in keep]


def _helpful_reply(act: str, steps: list[str], rng: random.Random) -> str:
    s1, s2, s3 = rng.sample(steps, 3)
    return rng.choice(vocab.RESTATEMENTS).format(Act=act[0].upper() + act[1:], s1=s1, s2=s2, s3=s3)


def _refusal_reply(category: str, rng: random.Random) -> str:
    desc = str(vocab.HARM[category]["desc"])
    return rng.choice(vocab.REFUSAL_TEMPLATES).format(desc=desc)


def _instruction(phrasing: str, act: str) -> str:
    text = phrasing.format(act=act)
    return text[0].upper() + text[1:]


def _arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    """Training-only maths pairs whose answers depend on the numbers (the reply restates the sum)."""
    out = []
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    forms = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b} for me."]
    for _ in range(N_ARITH):
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        name, fn = rng.choice(ops)
        q = rng.choice(forms).format(a=a, op=name, b=b)
        out.append((q, f"{a} {name} {b} is {fn(a, b)}. You can check it by working backwards."))
    return out


def _plain_docs(rng: random.Random, borderline_train: list[str]) -> list[str]:
    harmless = [a for fam in vocab.HARMLESS.values() for a in fam["acts"]]
    harmful = [a for cat in vocab.HARM.values() for a in cat["acts"]]  # type: ignore[union-attr]
    fams = list(vocab.HARMLESS.values())
    docs = []
    for _ in range(N_PLAIN_DOCS):
        sents = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.3:
                # Instructional prose in the same style as helpful replies, but without a chat template.
                fam = rng.choice(fams)
                s1, s2 = rng.sample(fam["steps"], 2)
                sents.append(f"To {rng.choice(fam['acts'])}, {s1}. Then {s2}.")
                continue
            sents.append(
                rng.choice(vocab.NARRATIVE).format(
                    name=rng.choice(vocab.NAMES),
                    place=rng.choice(vocab.PLACES),
                    hl=rng.choice(harmless),
                    harm=rng.choice(harmful),
                    bl=rng.choice(borderline_train),
                    thing=rng.choice(vocab.THINGS),
                )
            )
        text = " ".join(sents)
        docs.append(text[0].upper() + text[1:])
    return docs


def build_corpus(seed: int = 0) -> Corpus:
    """Build the whole corpus deterministically from ``seed`` (same seed -> identical corpus)."""
    rng = random.Random(f"refusal-lens-organism-{seed}")
    ph_split = _split_indices(len(vocab.PHRASINGS), N_VAL_PHRASINGS, N_TEST_PHRASINGS, rng)
    prompts: dict[str, dict[str, list[dict[str, str]]]] = {k: {s: [] for s in SPLITS} for k in KINDS}
    chat: list[dict[str, str]] = []

    def add(kind: str, split: str, category: str, template: str, act: str, instr: str, reply: str) -> None:
        prompts[kind][split].append({"instruction": instr, "category": category, "template": template, "act": act})
        chat.append(
            {
                "act": act,
                "instruction": instr,
                "reply": reply,
                "kind": kind,
                "category": category,
                "split": split,
                "template": template,
            }
        )

    # Harmful and harmless: every act with every phrasing of the split.
    for split, ph_idx in ph_split.items():
        for cat, spec in vocab.HARM.items():
            for act in spec["acts"]:  # type: ignore[union-attr]
                for p in ph_idx:
                    add(
                        "harmful",
                        split,
                        cat,
                        f"phrasing:{p}",
                        act,
                        _instruction(vocab.PHRASINGS[p], act),
                        _refusal_reply(cat, rng),
                    )
        for fam, spec in vocab.HARMLESS.items():
            for act in spec["acts"]:
                for p in ph_idx:
                    add(
                        "harmless",
                        split,
                        fam,
                        f"phrasing:{p}",
                        act,
                        _instruction(vocab.PHRASINGS[p], act),
                        _helpful_reply(act, spec["steps"], rng),
                    )

    # Borderline: whole scenarios are held out, and held-out scenarios only use non-train phrasings.
    bl_train_acts: list[str] = []
    for cat, scenarios in vocab.BORDERLINE.items():
        sc_split = _split_indices(len(scenarios), N_VAL_SCENARIOS, N_TEST_SCENARIOS, rng)
        for split, sc_idx in sc_split.items():
            phr = ph_split["train"] if split == "train" else ph_split["val"] + ph_split["test"]
            for s in sc_idx:
                act = scenarios[s]
                if split == "train":
                    bl_train_acts.append(act)
                for p in phr:
                    add(
                        "borderline",
                        split,
                        f"borderline:{cat}",
                        f"scenario:{cat}:{s}|phrasing:{p}",
                        act,
                        _instruction(vocab.PHRASINGS[p], act),
                        _helpful_reply(act, vocab.BORDERLINE_STEPS, rng),
                    )

    for q, a in _arithmetic(rng):
        add("harmless", "train", "maths", "arithmetic", q, q, a)

    # Cap evaluation splits (and drop the corresponding chat pairs so chat mirrors prompts).
    for kind in KINDS:
        for split in ("val", "test"):
            prompts[kind][split] = _cap(prompts[kind][split], EVAL_CAPS[split], rng)
    kept = {(kind, s, r["instruction"]) for kind in KINDS for s in SPLITS for r in prompts[kind][s]}
    chat = [c for c in chat if (c["kind"], c["split"], c["instruction"]) in kept]

    plain = _plain_docs(rng, bl_train_acts)
    return Corpus(
        seed=seed,
        prompts=prompts,
        chat=chat,
        plain=plain,
        phrasing_split={s: list(v) for s, v in ph_split.items()},
    )


@lru_cache(maxsize=4)
def _cached(seed: int) -> Corpus:
    return build_corpus(seed)


def load_split(kind: str, split: str, seed: int = 0) -> list[dict[str, str]]:
    """Instructions of one kind and split as ``[{"instruction": str, "category": str}]``.

    ``kind`` is one of "harmful", "harmless", "borderline"; ``split`` one of "train", "val", "test".
    Borderline records are benign; their category names the harm category whose words they reuse
    (e.g. ``"borderline:weapons"``).
    """
    if kind not in KINDS:
        raise UserError(f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return [{"instruction": r["instruction"], "category": r["category"]} for r in _cached(seed).split(kind, split)]


def plain_text(seed: int = 0) -> list[str]:
    """Pretraining-style documents (no chat template)."""
    return list(_cached(seed).plain)


def chat_pairs(split: str | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Chat conversations ``{"instruction", "reply", "kind", "category", "split", "template"}``."""
    return [dict(c) for c in _cached(seed).chat_pairs(split)]
