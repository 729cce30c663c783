"""Capability of a (possibly edited) model: lm-evaluation-harness tasks and the CE loss on local plain text.

* **lm-eval** (``pip install -e ".[eval]"``; EleutherAI's lm-evaluation-harness): the model in memory is wrapped
  in lm-eval's ``HFLM`` and scored with ``simple_evaluate``. A task is a registered name (most download their
  data from the Hugging Face hub) or a task YAML file, whose ``dataset_path: json`` with ``data_files`` reads
  local data; :func:`write_cloze_task` makes such a task from plain text. Only the tasks named are indexed
  (``include_defaults`` off) unless a registered name is asked for.
* **CE loss**: mean next-token cross-entropy (nats/token) on plain text (:func:`..metrics.ce_loss`).

Example:
    >>> capability(model, tokenizer, CapabilityConfig(lm_eval="task.yaml"), paragraphs, "work/")  # doctest: +SKIP
    {'lm_eval': {'local_cloze': {'acc': 0.62, 'acc_stderr': 0.03, ...}}, 'ce_loss_plain_text': 2.91, ...}
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.config_args import at_least
from ..core.errors import UserError
from ..core.models import input_device
from .metrics import ce_loss, plain_text_rows

CLOZE_TASK = "refusal_lens_cloze"


@dataclass
class CapabilityConfig:
    lm_eval: str = ""
    """Comma-separated lm-eval tasks: task YAML files (local data: dataset_path json + data_files) or registered
    task names (these usually download from the hub). Needs pip install -e ".[eval]"."""
    lm_eval_limit: int = field(default=0, metadata=at_least(0))
    """Examples per lm-eval task (0: all)."""
    lm_eval_cloze: int = field(default=0, metadata=at_least(0))
    """Also run a local multiple-choice cloze task of this many items made from the plain text (0: none)."""
    n_ce: int = field(default=64, metadata=at_least(0))
    """Plain-text passages (256 tokens at most each) for the CE loss (0: none)."""
    eval_batch_size: int = field(default=8, metadata=at_least(1))
    """Sequences per forward pass for lm-eval and the CE loss."""

    def tasks(self) -> list[str]:
        return [t.strip() for t in self.lm_eval.split(",") if t.strip()]

    def requested(self) -> bool:
        return bool(self.tasks() or self.lm_eval_cloze)


def check_tasks(config: CapabilityConfig) -> None:
    """Refuse missing or malformed task files and a missing lm-eval before any work."""
    _task_names(config.tasks())
    if config.requested():
        _require_lm_eval()


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            'lm-eval tasks need lm-evaluation-harness: pip install -e ".[eval]" (with torch pinned: '
            "pip freeze | grep -E '^(torch|transformers)==' > c.txt && pip install -c c.txt -e \".[eval]\")."
        )


def _task_names(tasks: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """``(task names, folders to index, whether lm-eval's own tasks are needed)`` for files and names."""
    import yaml

    names, folders, defaults = [], [], False
    for task in tasks:
        p = Path(task).expanduser()
        if p.suffix.lower() in (".yaml", ".yml"):
            if not p.is_file():
                raise UserError(f"--lm-eval task file {p} does not exist; pass a task YAML or a task name.")
            try:
                config = yaml.load(p.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # tags kept as text
            except yaml.YAMLError as exc:
                raise UserError(f"--lm-eval task file {p} is not valid YAML ({exc}).") from None
            if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                raise UserError(f"--lm-eval task file {p} has no 'task: NAME' entry.")
            names.append(config["task"])
            folders.append(str(p.resolve().parent))
        else:
            names.append(task)
            defaults = True
    return names, sorted(set(folders)), defaults


def lm_eval_scores(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (``acc``, ``acc_stderr``, ``acc_norm``...) from lm-eval's ``simple_evaluate``."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders, defaults = _task_names(tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=defaults)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval does not know task(s) {', '.join(unknown)}; pass a task YAML file or a known name.")
    padding_side = tokenizer.padding_side
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    try:
        out = simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=1000,
        )  # fmt: skip
    finally:
        tokenizer.padding_side = padding_side  # lm-eval may change it; refusal-lens pads on the left
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():  # "acc,none" -> "acc"; skip the alias and "N/A" stderrs
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "sample_len":
                clean[key.split(",")[0]] = float(value)
        results[task] = clean
    for task in names:
        if task in results:
            results[task]["n"] = float(out["n-samples"].get(task, {}).get("effective", 0))
    return results


def plain_text_ce(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 8):
    """Mean next-token CE (nats/token) on ``texts`` (each cut to ``max_length`` tokens); None when no rows."""
    rows = plain_text_rows(tokenizer, texts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ce_loss(model, rows, None, batch_size, pad) if rows else None


def capability(
    model: nn.Module, tokenizer: Any, config: CapabilityConfig, texts: Sequence[str] | None, work_dir: str | os.PathLike
) -> dict[str, Any]:
    """lm-eval task scores and the plain-text CE loss of ``model`` as it is now (weights edited or not).

    The cloze task (``config.lm_eval_cloze``) is written into ``work_dir`` from ``texts``.
    """
    tasks = config.tasks()
    if config.lm_eval_cloze:
        if not texts:
            raise UserError("--lm-eval-cloze needs plain text: pass --plain-text FILE.")
        tasks.append(str(write_cloze_task(texts, work_dir, CLOZE_TASK, n=config.lm_eval_cloze)))
    t0 = time.perf_counter()
    limit = config.lm_eval_limit or None
    out: dict[str, Any] = {
        "lm_eval": lm_eval_scores(model, tokenizer, tasks, limit, config.eval_batch_size) if tasks else None
    }
    t1 = time.perf_counter()
    ce_texts = list(texts or [])[: config.n_ce]
    out["ce_loss_plain_text"] = (
        plain_text_ce(model, tokenizer, ce_texts, batch_size=config.eval_batch_size) if ce_texts else None
    )
    out["n_plain_texts"] = len(ce_texts)
    out["seconds"] = {"lm_eval": t1 - t0, "ce_loss": time.perf_counter() - t1}
    return out


def before_after(
    model: nn.Module,
    tokenizer: Any,
    config: CapabilityConfig,
    texts: Sequence[str] | None,
    edit: Callable[[], AbstractContextManager[Any]],
) -> dict[str, dict[str, Any]]:
    """:func:`capability` of ``model`` as it is (``original``) and inside ``edit()`` (``edited``)."""
    with tempfile.TemporaryDirectory(prefix="refusal-lens-capability-") as work:
        out = {"original": capability(model, tokenizer, config, texts, work)}
        with edit():
            out["edited"] = capability(model, tokenizer, config, texts, work)
    return out


def side_by_side(results: dict[str, dict[str, Any]]) -> list[str]:
    """Text table: one row per measure (CE loss, each task's acc/acc_norm), one column per model."""
    names = list(results)
    rows = [("CE loss, plain text (nats/token)", [r.get("ce_loss_plain_text") for r in results.values()])]
    tasks = sorted({t for r in results.values() for t in (r.get("lm_eval") or {})})
    for task in tasks:
        for metric in ("acc", "acc_norm", "exact_match", "perplexity", "word_perplexity"):
            vals = [((r.get("lm_eval") or {}).get(task) or {}).get(metric) for r in results.values()]
            if any(v is not None for v in vals):
                rows.append((f"lm-eval {task} {metric}", vals))
    width = max(len(r[0]) for r in rows)
    lines = [" " * width + "".join(f"  {n:>12}" for n in names)]
    for label, vals in rows:
        lines.append(label.ljust(width) + "".join(f"  {'-' if v is None else f'{v:.4g}':>12}" for v in vals))
    return lines


def write_cloze_task(
    texts: Sequence[str], folder: str | os.PathLike, name: str = CLOZE_TASK, n: int = 100, seed: int = 0
) -> Path:
    """A local lm-eval multiple-choice task from plain text; returns the YAML file.

    Each item: the first half of a passage's first 24 words as context; the choices are its true second half and
    three different second halves of other passages (shuffled, seeded); accuracy = picking the true
    continuation by log-likelihood (chance 0.25). The data is ``FOLDER/NAME.jsonl``, read with
    ``dataset_path: json``: no hub needed.
    """
    spans = [t.split()[:24] for t in texts if len(t.split()) >= 8]  # short spans: the second half follows the first
    halves = [(" ".join(w[: len(w) // 2]), " " + " ".join(w[len(w) // 2 :])) for w in spans]
    endings = sorted({e for _, e in halves})
    if len(endings) < 4:
        raise UserError("a cloze task needs at least 4 texts of 8 or more words with different endings.")
    rng = random.Random(seed)
    rows = []
    for i in rng.sample(range(len(halves)), k=min(n, len(halves))):
        context, true = halves[i]
        choices = [true, *rng.sample([e for e in endings if e != true], 3)]  # three other, distinct endings
        perm = rng.sample(range(4), 4)
        rows.append({"context": context, "choices": [choices[k] for k in perm], "label": perm.index(0)})
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return yaml_path
