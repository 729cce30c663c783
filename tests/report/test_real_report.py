"""scripts/real_report.py: the #16 artifacts in docs/results-16/ render through `refusal-lens report`'s renderer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_real_model_report_has_a_section_per_paper(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_report.py"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "r" / "report.html").read_text()
    kissane = json.loads((ROOT / "docs" / "results-16" / "kissane-l12" / "kissane.json").read_text())
    lee = json.loads((ROOT / "docs" / "results-16" / "lee-l12-to-l23" / "lee.json").read_text())
    assert "smollm2-safe" in html and "Refusal rates, KL and loss" in html  # Arditi et al. (table 2)
    for sae in kissane["saes"]:  # Kissane et al.: each SAE's cosine, as measured
        assert f"{sae['cosine']:.3f}" in html
    assert f"{lee['upstream']['dot_all']['positive'][0]['latent']}" in html  # Lee et al.: the top upstream latent
    assert "Where the harm word" in html and (tmp_path / "r" / "figures" / "decomposition.png").stat().st_size > 0
