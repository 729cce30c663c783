"""Stage 5, the report: results.json (+ lens results) → one self-contained HTML file. Imports core and lens.

The HTML report of an evaluation folder: one self-contained file plus the same figures as PNGs.

``report.html`` has no scripts and loads nothing at view time: figures are inline base64 PNGs, the style
sheet is inline, and a Content-Security-Policy forbids scripts and remote loads, so even a bug in escaping
could not run code. Every piece of text from the data (prompts, replies, category and condition names) goes
through :func:`html.escape`.

Example:
    >>> build_report("out/eval")          # writes out/eval/report.html and out/eval/figures/*.png  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.io import atomic_path, atomic_write_text, read_json

_CSS = Path(__file__).with_name("style.css")
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
N_EXAMPLES = 6


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _num(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{float(x):.{digits}f}"


def _img(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)} (also figures/{_e(name)}.png)</figcaption></figure>"
    )


def _rate_table(results: Mapping[str, Any]) -> str:
    sets = list(results["prompt_sets"])
    head = "".join(f"<th>{_e(s)} (n={_e(results['prompt_sets'][s]['n'])})</th>" for s in sets)
    rows = []
    for cond, entry in results["conditions"].items():
        cells = "".join(
            f'<td class="num">{_pct(entry[s]["refusal_rate"])} '
            f"[{_pct(entry[s]['ci95'][0])}, {_pct(entry[s]['ci95'][1])}]</td>"
            for s in sets
        )
        ce = entry.get("ce_loss") or {}
        reply = entry.get("kl_harmless_reply") or {}
        rows.append(
            f"<tr><th>{_e(cond)}</th>{cells}<td class='num'>{_num(entry.get('kl_harmless'))}</td>"
            f"<td class='num'>{_num(reply.get('mean'))}</td>"
            + "".join(
                f"<td class='num'>{_num(ce.get(k))}</td>" for k in ("plain_text", "instruction", "own_completions")
            )
            + "</tr>"
        )
    return (
        f"<table><tr><th>condition</th>{head}<th>KL first token</th><th>KL reply</th>"
        "<th>CE plain</th><th>CE instruction</th><th>CE own replies</th></tr>" + "".join(rows) + "</table>"
    )


def _judge_table(results: Mapping[str, Any]) -> str:
    judges = [j["name"] for j in results.get("judges", [])]
    rows = []
    for cond, entry in results["conditions"].items():
        for s in results["prompt_sets"]:
            rates = "".join(f"<td class='num'>{_pct(entry[s]['judges'].get(j, {}).get('rate'))}</td>" for j in judges)
            agree = entry[s].get("agreement", {}).get("all")
            rows.append(f"<tr><th>{_e(cond)}</th><td>{_e(s)}</td>{rates}<td class='num'>{_pct(agree)}</td></tr>")
    head = "".join(f"<th>{_e(j)}</th>" for j in judges)
    overall = results.get("agreement_overall", {})
    pairs = ", ".join(f"{_e(k)}: {_pct(v)}" for k, v in overall.items())
    return (
        f"<table><tr><th>condition</th><th>set</th>{head}<th>all agree</th></tr>{''.join(rows)}</table>"
        f"<p class='meta'>Pairwise agreement over all completions: {pairs}</p>"
    )


def _examples(results: Mapping[str, Any], completions: Sequence[Mapping[str, Any]], n: int = N_EXAMPLES) -> str:
    conds = list(results["conditions"])
    primary = results.get("primary_judge", "substring")
    index: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    order: dict[str, list[str]] = {}
    for c in completions:
        key = (str(c.get("prompt_set")), str(c.get("prompt")), str(c.get("intervention")))
        index.setdefault(key, c)
        seen = order.setdefault(str(c.get("prompt_set")), [])
        if str(c.get("prompt")) not in seen:
            seen.append(str(c.get("prompt")))
    out = []
    for set_name, prompts in order.items():
        head = "".join(f"<th>{_e(c)}</th>" for c in conds)
        rows = []
        for prompt in prompts[:n]:
            cells = []
            for cond in conds:
                comp = index.get((set_name, prompt, cond))
                if comp is None:
                    cells.append("<td></td>")
                    continue
                refused = bool((comp.get("judgements") or {}).get(primary))
                flags = ", ".join(f"{k}={'R' if v else '-'}" for k, v in (comp.get("judgements") or {}).items())
                cls = "refused" if refused else "complied"
                cells.append(
                    f'<td class="{cls}">{_e(comp.get("completion", ""))}<span class="tag">{_e(flags)}</span></td>'
                )
            rows.append(f"<tr><td>{_e(prompt)}</td>{''.join(cells)}</tr>")
        out.append(
            f"<h3>{_e(set_name)}</h3><table class='examples'><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"
        )
    return "".join(out)


def render_html(
    results: Mapping[str, Any],
    completions: Sequence[Mapping[str, Any]],
    figures: Mapping[str, tuple[bytes, str]],
    selection: Mapping[str, Any] | None = None,
    lens_figures: Mapping[str, tuple[bytes, str]] | None = None,
) -> str:
    """The report page. ``figures`` maps a name to ``(png bytes, caption)``."""
    direction = results.get("direction")
    where = (
        f"direction at layer {_e(direction['layer'])}, position {_e(direction['position'])}"
        if direction
        else "no direction (baseline only)"
    )
    skipped = results.get("skipped_conditions") or {}
    notes = "".join(f"<p class='note'>{_e(k)} skipped: {_e(v)}</p>" for k, v in skipped.items())
    if selection and selection.get("explanation"):
        notes += f"<p class='meta pre'>Selection: {_e(selection['explanation'])}</p>"
    figs = "".join(_img(name, png, caption) for name, (png, caption) in figures.items())
    lens = ""
    if results.get("sae_lens"):
        from .lens import lens_section

        tags = "".join(_img(name, png, caption) for name, (png, caption) in (lens_figures or {}).items())
        lens = lens_section(results["sae_lens"], tags)
    css = _CSS.read_text(encoding="utf-8")
    tokens = ", ".join(repr(t) for t in (results.get("refusal_tokens") or {}).get("tokens", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>refusal-lens report: {_e(results.get("model", ""))}</title>
<style>{css}</style></head><body>
<h1>refusal-lens evaluation</h1>
<p class="meta">model {_e(results.get("model", ""))}; {where}; primary judge {_e(results.get("primary_judge"))};
refusal tokens {_e(tokens)}; schema v{_e(results.get("schema_version"))}</p>
{notes}
<h2>Refusal rates, KL and loss</h2>
<p class="meta">Rates with Wilson 95 % intervals. KL vs the baseline on harmless prompts (first reply token, and
over the baseline's reply, teacher-forced). CE loss in nats/token.</p>
{_rate_table(results)}
<h2>Figures</h2>
{figs}
<h2>Judges</h2>
{_judge_table(results)}
{lens}
<h2>Example completions</h2>
<p class="meta">R = the judge says refused. Cells are coloured by the primary judge.</p>
{_examples(results, completions)}
</body></html>
"""


def _read_completions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON Lines ({exc}); re-run evaluate.") from None


def build_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Rebuild ``report.html`` and ``figures/*.png`` from a folder written by ``refusal-lens evaluate``."""
    from . import figures as F

    folder = Path(results_dir)
    results = read_json(folder / "results.json", "results file")
    if not isinstance(results, dict) or "conditions" not in results or "prompt_sets" not in results:
        raise UserError(f"{folder / 'results.json'} is not a refusal-lens results file; run evaluate first.")
    completions = _read_completions(folder / "completions.jsonl")
    selection = None
    for name in ("selection.json", "direction.json"):
        if (folder / name).is_file():
            data = read_json(folder / name, name)
            selection = data.get("selection", data) if isinstance(data, dict) else None
            if selection and selection.get("candidates"):
                break
    figs: dict[str, tuple[bytes, str]] = {
        "refusal_rates": (F.refusal_rate_figure(results), "Refusal rate per condition, Wilson 95 % error bars")
    }
    cat = F.category_figure(results, "harmful") if "harmful" in results["prompt_sets"] else None
    if cat:
        figs["categories_harmful"] = (cat, "Refusal rate per category of the harmful prompts")
    figs["judges"] = (F.judge_figure(results), "Refusal rate by judge")
    heat = F.candidate_heatmaps(selection) if selection else None
    if heat:
        figs["candidates"] = (heat, "Direction candidates by layer and position (star = chosen)")
    lens_figs: dict[str, tuple[bytes, str]] = {}
    decomposition = (results.get("sae_lens") or {}).get("decomposition")
    if decomposition:
        from .lens import decomposition_figure

        lens_figs["decomposition"] = (decomposition_figure(decomposition), "Sparsity of the direction in each SAE")
    for name, (png, _) in {**figs, **lens_figs}.items():
        with atomic_path(folder / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    target = Path(out) if out else folder / "report.html"
    atomic_write_text(target, render_html(results, completions, figs, selection, lens_figs))
    return target
