"""Issue 4 acceptance on the model organism (slow; skipped until the shipped checkpoint exists).

Judges must agree on >= 95 % of completions, and the logit judge's rate must be within 5 points of the
substring judge's, for every condition and prompt set.
"""

from __future__ import annotations

import pytest
import torch

from refusal_lens.core.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def organism_results():
    from refusal_lens import organism
    from refusal_lens.core.models import load_model
    from refusal_lens.direction.compute import Direction, compute_direction
    from refusal_lens.evaluation.conditions import EvalSettings, evaluate_conditions, standard_conditions
    from refusal_lens.organism import load_prompts

    try:
        organism.path()
    except UserError as exc:
        pytest.skip(f"no organism checkpoint yet: {exc}")
    torch.set_num_threads(1)
    model, tok = load_model()
    texts = {k: [p.instruction for p in load_prompts(f"organism:{k}:train")] for k in ("harmful", "harmless")}
    val = {k: [p.instruction for p in load_prompts(f"organism:{k}:val")] for k in ("harmful", "harmless")}
    found = compute_direction(
        model, tok, texts["harmful"], texts["harmless"], val["harmful"], val["harmless"], progress=False
    )
    direction = found.direction
    if direction is None:  # selection is the organism's concern; the judges only need some direction
        layer = 5 * found.candidates.shape[1] // 8
        direction = Direction(found.candidates[-1, layer], layer, -1)
    conditions, info = standard_conditions(model, direction, positions="prompt")
    sets = {k: load_prompts(f"organism:{k}:test") for k in ("harmful", "harmless", "borderline")}
    return evaluate_conditions(
        model, tok, conditions, sets, EvalSettings(n_prompts=128), direction=direction, descriptions=info,
        progress=False,
    )  # fmt: skip


def test_judges_agree_on_the_organism(organism_results):
    assert organism_results["agreement_overall"]["substring|logit"] >= 0.95
    assert organism_results["agreement_overall"]["substring|prefix"] >= 0.95
    for cond, entry in organism_results["conditions"].items():
        for set_name in organism_results["prompt_sets"]:
            judges = entry[set_name]["judges"]
            gap = abs(judges["logit"]["rate"] - judges["substring"]["rate"])
            assert gap <= 0.05, (cond, set_name, judges)
