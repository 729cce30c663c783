"""With a model other than the organism, no command silently uses the organism's corpus or prompt sets."""

from __future__ import annotations

import json

from refusal_lens.cli.main import main
from refusal_lens.core.models import ORGANISM_CHECKPOINT, is_organism_model

from ..conftest import HARMFUL, HARMLESS


def test_is_organism_model(saved_model):
    assert is_organism_model(None) and is_organism_model(ORGANISM_CHECKPOINT)
    assert not is_organism_model(saved_model) and not is_organism_model("smollm2")


def test_sae_train_and_eval_need_a_data_file_for_another_model(saved_model, tmp_path, capsys):
    for action in (["train", "--layer", "1", "--out", str(tmp_path / "sae")], ["eval", "--sae", str(tmp_path)]):
        assert main(["sae", action[0], "--model", str(saved_model), *action[1:]]) == 2
        out = capsys.readouterr()
        assert "--data-file is required when --model is given" in out.out + out.err
    assert not (tmp_path / "sae").exists()


def test_sae_decompose_needs_prompts_for_another_model(saved_model, tmp_path, capsys):
    rc = main(["sae", "decompose", "--model", str(saved_model), "--direction", "d", "--out", str(tmp_path / "o")])
    out = capsys.readouterr()
    assert rc == 2 and "--harmful and --harmless are required" in out.out + out.err


def test_evaluate_says_which_ce_losses_it_cannot_measure(saved_model, tmp_path, capsys):
    harmful, harmless = tmp_path / "h.json", tmp_path / "b.json"
    harmful.write_text(json.dumps(HARMFUL[:2]))
    harmless.write_text(json.dumps(HARMLESS[:2]))
    rc = main([
        "evaluate", "--model", str(saved_model), "--harmful", "organism:harmful:test", "--harmless", str(harmless),
        "--max-new-tokens", "2", "--n-ce", "2", "--refusal-tokens", "5", "--quiet", "--out", str(tmp_path / "e"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "pass --plain-text FILE and --instruction-data FILE" in err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    losses = next(iter(results["conditions"].values()))["ce_loss"]
    assert losses["plain_text"] is None and losses["instruction"] is None  # not the organism corpus' losses
