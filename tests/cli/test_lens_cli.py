"""`refusal-lens sae decompose` and `refusal-lens upstream` on a tiny model with SAEs saved in SAELens format."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.cli.main import main
from refusal_lens.direction.compute import Direction
from refusal_lens.report.lens import lens_section
from refusal_lens.sae import SAEConfig, create_sae
from refusal_lens.sae.formats import save_saelens

from ..conftest import HARMFUL, HARMLESS


@pytest.fixture
def lens_inputs(saved_model, tmp_path):
    torch.manual_seed(0)
    Direction(torch.randn(32), layer=3, position=-1).save(tmp_path / "dir")
    saes = []
    for name, layer in (("chat", 3), ("text", 3), ("early", 1)):
        sae = create_sae(SAEConfig(arch="topk", d_in=32, width=64, k=4))
        saes.append(save_saelens(sae, tmp_path / name, {"hook_name": f"blocks.{layer}.hook_resid_pre"}))
    (tmp_path / "h.json").write_text(json.dumps(HARMFUL))
    (tmp_path / "b.json").write_text(json.dumps(HARMLESS))
    return saved_model, tmp_path


def test_decompose_command_compares_saes(lens_inputs, capsys):
    model, tmp = lens_inputs
    code = main(
        [
            "sae",
            "decompose",
            "--model",
            str(model),
            "--direction",
            str(tmp / "dir"),
            "--sae",
            str(tmp / "chat"),
            "--sae",
            str(tmp / "text"),
            "--harmful",
            str(tmp / "h.json"),
            "--harmless",
            str(tmp / "b.json"),
            "--max-k",
            "8",
            "--out",
            str(tmp / "dec"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp / "dec" / "decomposition.json").read_text())
    assert [s["name"] for s in data["saes"]] == ["chat", "text"]
    for s in data["saes"]:
        assert {"cosine", "relative_error", "max_single_latent_cosine", "sparsity_curve"} <= set(s)
        assert [k for k, _ in s["sparsity_curve"]] == [1, 2, 4, 8]
        assert all(0 <= err <= 1 + 1e-9 for _, err in s["sparsity_curve"])
    assert (tmp / "dec" / "decomposition.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "chat" in printed and "text" in printed and "decomposition.json" in printed


def test_decompose_rejects_a_wrong_width_sae(lens_inputs, capsys):
    model, tmp = lens_inputs
    save_saelens(
        create_sae(SAEConfig(arch="topk", d_in=48, width=64, k=4)),
        tmp / "wide",
        {"hook_name": "blocks.3.hook_resid_pre"},
    )
    code = main(
        [
            "sae",
            "decompose",
            "--model",
            str(model),
            "--direction",
            str(tmp / "dir"),
            "--sae",
            str(tmp / "wide"),
            "--harmful",
            str(tmp / "h.json"),
            "--harmless",
            str(tmp / "b.json"),
            "--out",
            str(tmp / "dec"),
        ]
    )
    assert code == 2 and "48" in capsys.readouterr().err
    assert not (tmp / "dec").exists()


def test_upstream_command_writes_latents_and_checks(lens_inputs, capsys):
    model, tmp = lens_inputs
    code = main(
        [
            "upstream",
            "--model",
            str(model),
            "--direction",
            str(tmp / "dir"),
            "--sae",
            str(tmp / "early"),
            "--prompt",
            "how do i bake bread",
            "--paraphrase",
            "how can i bake bread",
            "--top",
            "3",
            "--out",
            str(tmp / "up"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp / "up" / "upstream.json").read_text())
    assert len(data["positive"]) == 3 and len(data["negative"]) == 3
    assert data["positive"][0]["score"] >= data["positive"][-1]["score"] >= data["negative"][0]["score"]
    entry = data["prompts"][0]
    assert len(entry["first_order_check"]) == 3 and entry["sensitivity"]["paraphrase"][0]["overlap"] >= 0
    assert (tmp / "up" / "saliency_0.png").is_file()
    # the source layer must come before the target layer
    code = main(
        [
            "upstream",
            "--model",
            str(model),
            "--direction",
            str(tmp / "dir"),
            "--sae",
            str(tmp / "chat"),
            "--prompt",
            "hi",
            "--out",
            str(tmp / "up2"),
        ]
    )
    assert code == 2 and "must come before" in capsys.readouterr().err


def test_lens_report_section_escapes_text():
    evil = "<script>alert(1)</script>"
    lens = {
        "decomposition": [
            {
                "name": evil,
                "cosine": 0.5,
                "relative_error": 0.4,
                "max_single_latent_cosine": 0.3,
                "latents_for_half_error": 4,
            }
        ],
        "upstream": [
            {
                "prompt": evil,
                "value": 1.0,
                "positive": [{"latent": 1, "score": 0.2}],
                "negative": [{"latent": 2, "score": -0.1}],
            }
        ],
        "dashboards": [
            {
                "latent": 1,
                "fire_rate": 0.1,
                "decoder_cosine_with_r": 0.2,
                "histogram": {"counts": [1, 2], "max": 1.0},
                "top_contexts": [{"activation": 1.0, "before": evil, "token": evil, "after": ""}],
            }
        ],
    }
    html = lens_section(lens)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_lens_section_shows_where_the_word_effect_passes():
    shares = [{"word": 1.0, "instruction": 0.0, "template": 0.0}, {"word": -0.01, "instruction": 0.0, "template": 1.01}]
    lens = {"word_mediation": {"n_prompts": 7, "mean_R": 4.43, "mean_R_swapped": 0.66,
                               "layers": [{"layer": i, "shares": s} for i, s in enumerate(shares)]}}  # fmt: skip
    html = lens_section(lens)
    assert "7 borderline prompts" in html and "from 4.43 to 0.66" in html
    rows = html.split("<tr>")[2:]
    assert rows[0].startswith("<td>0</td><td>100%</td><td>0%</td><td>0%</td>")
    assert rows[1].startswith("<td>1</td><td>-1%</td><td>0%</td><td>101%</td>")
    assert "effect on refusal" not in lens_section({"word_mediation": {"n_prompts": 0}})  # nothing measured


def test_upstream_command_patches_a_words_effect(lens_inputs, capsys):
    model, tmp = lens_inputs
    args = ["upstream", "--model", str(model), "--direction", str(tmp / "dir"), "--sae", str(tmp / "early"),
            "--prompt", "explain how to steal a car", "--word", "steal", "--out", str(tmp / "up")]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    med = json.loads((tmp / "up" / "upstream.json").read_text())["prompts"][0]["word_mediation"]
    assert med["n_prompts"] == 1 and [x["layer"] for x in med["layers"]] == [0, 1, 2]
    # at the embeddings only the swapped tokens differ: the word's tokens carry the whole change
    assert med["layers"][0]["shares"]["word"] == pytest.approx(1.0, abs=1e-5)
    assert "resid_pre[0]: 100% / 0% / 0%" in capsys.readouterr().out
