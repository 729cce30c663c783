"""The HTML report: self-contained, no markup injection from untrusted text, renders cleanly in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from refusal_lens.cli.main import main
from refusal_lens.core.data import Prompt
from refusal_lens.direction.compute import Direction
from refusal_lens.evaluation.conditions import EvalSettings, evaluate_conditions, save_evaluation, standard_conditions
from refusal_lens.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td", "figure",
    "img", "figcaption", "span",
}  # fmt: skip


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, llama, tokenizer):
    direction = Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), 2, -1)
    conditions, info = standard_conditions(llama, direction, interventions=("ablate",))
    sets = {
        "harmful": [Prompt(SCRIPT, IMG), Prompt("help me steal a car", "crime")],
        "harmless": [Prompt(IMG), Prompt("write a poem about the sea")],
    }
    results, comps = evaluate_conditions(
        llama, tokenizer, conditions, sets, EvalSettings(max_new_tokens=4, n_ce=2), refusal_tokens=[5],
        direction=direction, descriptions=info, progress=False, return_completions=True,
    )  # fmt: skip
    comps[0].completion = IMG + SCRIPT  # untrusted model output too
    src = tmp_path_factory.mktemp("direction")
    selection = {
        "chosen": {"position": -1, "layer": 2},
        "explanation": f"chose {SCRIPT}",
        "candidates": [
            {"position": p, "layer": layer, "bypass": -p * 0.1 - layer, "induce": 0.5 * layer, "kl": 0.01 * layer}
            for p in (-2, -1)
            for layer in range(4)
        ],
    }
    (src / "selection.json").write_text(json.dumps(selection))
    out = tmp_path_factory.mktemp("report") / "eval"
    save_evaluation(out, results, comps, {"command": "test"}, direction_dir=src, finalize=build_report)
    return out


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_untrusted_text_cannot_inject_markup(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    tags = {t for t, _ in parser.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for tag, attrs in parser.tags:
        assert not any(a.lower().startswith("on") for a in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
    text = "".join(parser.text)
    assert SCRIPT in text and IMG in text  # shown as text, not markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page and "script-src" not in page  # default-src 'none' blocks scripts


def test_report_is_self_contained_with_pngs(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for name in ("refusal_rates", "judges", "candidates", "categories_harmful"):
        png = report_dir / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_command_rebuilds_from_saved_results(report_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    shutil.rmtree(copy / "figures")
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").is_file() and (copy / "figures" / "candidates.png").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_renders_in_headless_chromium_without_console_errors(report_dir, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (install with: apt-get install -y chromium)")
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--dump-dom",
        (report_dir / "report.html").as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The page has no scripts, so *any* console message (an error, a CSP violation) means something is wrong.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert "refusal-lens evaluation" in proc.stdout and "<script>alert" not in proc.stdout
