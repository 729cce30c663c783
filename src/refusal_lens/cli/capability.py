"""``refusal-lens capability``: lm-eval tasks and the plain-text CE loss of a model, beside a baseline.

Example (the abliterated model beside its original, on a local multiple-choice task and local text):
    refusal-lens capability --model abliterated/ --baseline smollm2 --plain-text corpus.json \
        --lm-eval task.yaml --lm-eval-cloze 100
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

from ..core.config_args import add_dataclass_arguments, dataclass_from_args
from ..core.errors import UserError
from ..core.models import model_name
from ..evaluation.capability import CapabilityConfig, capability, check_tasks, side_by_side
from .common import add_model_arguments, add_plain_text_argument, load_model_from_args, plain_texts_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--baseline",
        default=None,
        help="a second model measured the same way and shown beside --model (e.g. the original of an edited model)",
    )
    add_plain_text_argument(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_dataclass_arguments(p.add_argument_group("capability"), CapabilityConfig)


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(CapabilityConfig, args)
    check_tasks(cfg)  # before loading any model
    texts = plain_texts_from_args(args)
    if not cfg.tasks() and not (texts and (cfg.n_ce or cfg.lm_eval_cloze)):
        raise UserError("nothing to measure: pass --lm-eval TASKS and/or --plain-text FILE (CE loss, --lm-eval-cloze).")
    results = {}
    with tempfile.TemporaryDirectory(prefix="refusal-lens-capability-") as work:
        for label, name in (("model", args.model), ("baseline", args.baseline)):
            if label == "baseline" and name is None:
                continue
            one = copy.copy(args)
            one.model = name
            model, tokenizer = load_model_from_args(one)
            results[label] = {"name": model_name(model), **capability(model, tokenizer, cfg, texts, work)}
            del model
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(side_by_side(results)))
    return 0
