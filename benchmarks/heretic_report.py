"""The report of `bench_heretic.py`: heretic's trials from its Optuna journal, both fronts, wall-time ratios, plot.

python benchmarks/bench_heretic.py report --work W [--system S] [--figure F]
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def _tag(system: str | None) -> str:
    return "sys" if system else "nosys"


def heretic_trials(run_dir: Path) -> list[dict]:
    """Every finished trial of a heretic study (its own evaluation: refusal count, KL), from the Optuna journal."""
    attrs: dict[int, dict] = {}
    done: dict[int, str] = {}
    for path in (run_dir / "study").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            op = json.loads(line)
            if op.get("op_code") == 8:
                attrs.setdefault(op["trial_id"], {}).update(op["user_attr"])
            if op.get("op_code") == 6 and op.get("state") == 1:
                done[op["trial_id"]] = op["datetime_complete"]
    out = []
    for t, a in sorted(attrs.items()):
        if t in done and "refusals" in a:
            out.append({"trial": t, "index": a.get("index"), "refusals": a["refusals"], "n": a["n_bad_prompts"],
                        "kl": a["kl_divergence"],
                        "base_refusals": a.get("base_refusals"), "completed": done[t]})  # fmt: skip
    return out


def _front(rows: list[dict], key: str) -> list[dict]:
    best, front = float("inf"), []
    for r in sorted(rows, key=lambda r: (r["kl"], r[key])):
        if r[key] < best:
            front.append(r)
            best = r[key]
    return front


def _heretic_runs(w: Path, tag: str) -> dict[str, dict]:
    """Every heretic run folder of this condition: its trials and its wall time (measured, or extrapolated to
    the requested trial count from the trials finished so far when the run is still going or was stopped)."""
    runs = {}
    for run_dir in sorted(w.glob(f"heretic*-{tag}")):
        trials = heretic_trials(run_dir)
        if not trials or not (run_dir / "timing.json").is_file():
            continue
        timing = json.loads((run_dir / "timing.json").read_text())
        done = [datetime.fromisoformat(t["completed"]).replace(tzinfo=timezone.utc).timestamp() for t in trials]
        if "end" in timing and len(trials) >= timing["trials"]:
            wall, measured = timing["end"] - timing["start"], True
        else:  # still going or stopped early: start-up (to the first trial) plus the mean time per later trial,
            # times the trials asked for (each trial abliterates and evaluates the same prompts)
            first, last = min(done), max(done)
            per_trial = (last - first) / max(len(done) - 1, 1)
            wall, measured = (first - timing["start"]) + per_trial * (timing["trials"] - 1), False
        runs[run_dir.name] = {"trials": trials, "n_trials": len(trials), "target": timing["trials"], "wall": wall,
                              "measured": measured, "elapsed": max(done) - timing["start"],
                              "load": timing.get("load_start")}  # fmt: skip
    return runs


def cmd_report(args) -> None:
    w, tag = Path(args.work), _tag(args.system)
    condition = f"system prompt {args.system!r}" if args.system else "no system prompt"
    ours = json.loads((w / f"eval-ours-{tag}.json").read_text())
    path = w / f"eval-ours-heretic-{tag}.json"
    ours_h = json.loads(path.read_text())["points"] if path.is_file() else []
    runs = _heretic_runs(w, tag)
    # our own front check runs on heretic's evaluation prompts (its 39 harmful, first-token KL on its 100 harmless
    # when --n-search 100): the same numbers, our substring judge and 64 tokens instead of its markers and 100
    checked = json.loads((w / f"ours-{tag}" / "front.json").read_text())["checked"]
    ours_c = [{"refusals": r["refusals_generated"], "kl": r["kl"], "seconds": ours["startup_s"] + r["seconds"]}
              for r in checked]  # fmt: skip
    lines = [f"## refusal-lens abliterate vs heretic ({condition}; {Path(args.model).name})", "",
             f"refusal-lens: {ours['wall_s']:.0f} s wall for the whole command (start-up and load "
             f"{ours['startup_s']:.0f} s, directions, {ours['summary']['evaluations']} scored points, front check); "
             f"load average {ours.get('load')}."]  # fmt: skip
    for name, r in runs.items():
        how = "measured" if r["measured"] else (f"extrapolated from {r['n_trials']} trials in {r['elapsed']:.0f} s")
        lines.append(f"{name}: {r['target']} trials, {r['wall']:.0f} s ({how}; load average at start {r['load']}); "
                     f"ratio heretic / refusal-lens = **{r['wall'] / ours['wall_s']:.1f}x**.")  # fmt: skip
    lines += ["", "### Independent evaluator (JailbreakBench 100 harmful, Alpaca test 100 harmless; greedy 100 tokens)",
              "", "| point | harmful refused /100 | first-token KL | harmless identical /100 | found after (s) |",
              "|---|---|---|---|---|", f"| original | {ours['original_refusals']} | 0 | 100 | |"]  # fmt: skip
    pts = sorted(ours["points"], key=lambda r: r["kl"])
    for r in pts:
        lines.append(f"| refusal-lens | {r['refusals']} | {r['kl']:.4f} | {r['identical']} | {r['seconds']:.0f} |")
    path = w / f"eval-heretic-{tag}.json"  # heretic's Pareto trials, saved by heretic (heretic-export)
    heretic_ind = json.loads(path.read_text())["points"] if path.is_file() else []
    for h in sorted(heretic_ind, key=lambda r: r["kl"]):
        by = [o for o in pts if o["refusals"] <= h["refusals"] and o["kl"] <= h["kl"]]
        first = min(by, key=lambda o: o["seconds"], default=None)
        dominated = "no" if first is None else f"{first['refusals']} @ {first['kl']:.4f} ({first['seconds']:.0f} s)"
        lines.append(f"| heretic trial {h.get('trial', h['model'])} ({h.get('heretic_refusals')}/39 @ "
                     f"{h.get('heretic_kl', float('nan')):.4f} by its evaluator); dominated by refusal-lens: "
                     f"{dominated} | {h['refusals']} | {h['kl']:.4f} | {h['identical']} | |")  # fmt: skip
    for name, r in runs.items():
        trials = r["trials"]
        n, base = trials[0]["n"], trials[0]["base_refusals"]
        hf = _front(trials, "refusals")
        n_kl = len(json.loads((w / "data" / "harmless_val.json").read_text()))
        lines += ["", f"### heretic's evaluator ({n} harmful validation prompts, its refusal markers; KL on {n_kl} "
                  f"harmless evaluation prompts; original {base}/{n}): {name}, {len(trials)} trials", "",
                  "| heretic front: trial | refusals | KL | first refusal-lens point that dominates it, by heretic's "
                  "evaluator (found after) | ... by refusal-lens's own check on the same prompts |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for h in hf:
            cells = []
            for pool in (ours_h, ours_c):
                by = [o for o in pool if o["refusals"] <= h["refusals"] and o["kl"] <= h["kl"]]
                first = min(by, key=lambda o: o["seconds"], default=None)
                cells.append("not scored" if not pool else "no" if first is None else
                             f"{first['refusals']}/{n} at {first['kl']:.4f} ({first['seconds']:.0f} s)")  # fmt: skip
            lines.append(f"| {h['index']} | {h['refusals']}/{n} | {h['kl']:.4f} | {cells[0]} | {cells[1]} |")
        pick = min((t for t in hf if t["kl"] <= 0.1), key=lambda t: (t["refusals"], t["kl"]), default=None)
        if pick:
            lines += ["", f"heretic's pick (fewest refusals with KL <= 0.1): trial {pick['trial']}, "
                      f"{pick['refusals']}/{n} at KL {pick['kl']:.4f}."]  # fmt: skip
    lines += ["", "refusal-lens checked points, own check on heretic's prompts: " + ", ".join(
        f"{o['refusals']} @ {o['kl']:.4f}" for o in sorted(ours_c, key=lambda o: o["kl"]))]  # fmt: skip
    if ours_h:
        lines += ["", "refusal-lens points by heretic's evaluator: " + ", ".join(
            f"{o['refusals']}/{o['n']} @ {o['kl']:.4f}" for o in sorted(ours_h, key=lambda o: o["kl"]))]  # fmt: skip
    (w / f"report-{tag}.md").write_text("\n".join(lines) + "\n")
    _plot(Path(args.figure or w / f"fronts-{tag}.png"), pts, ours_h or ours_c, runs, condition, heretic_ind)
    print("\n".join(lines))


def _plot(path: Path, ours: list[dict], ours_h: list[dict], runs: dict[str, dict], condition: str,
          heretic_ind: list[dict]) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    of = _front(ours, "refusals")
    axes[0].scatter([r["kl"] for r in ours], [r["refusals"] for r in ours], c="#4c72b0", s=12, label="refusal-lens")
    axes[0].step([r["kl"] for r in of], [r["refusals"] for r in of], where="post", c="#4c72b0")
    if heretic_ind:
        hf = _front(heretic_ind, "refusals")
        axes[0].scatter([r["kl"] for r in heretic_ind], [r["refusals"] for r in heretic_ind], c="#dd8452", s=12,
                        marker="s", label="heretic (its Pareto trials)")  # fmt: skip
        axes[0].step([r["kl"] for r in hf], [r["refusals"] for r in hf], where="post", c="#dd8452")
        axes[0].legend(fontsize=7)
    axes[0].set(xscale="symlog", xlabel="first-token KL (Alpaca test)", ylabel="JailbreakBench refused /100",
                title=f"independent evaluator, {condition}")  # fmt: skip
    colours = iter(["#dd8452", "#c44e52", "#8172b3"])
    for name, r in runs.items():
        c, hf = next(colours), _front(r["trials"], "refusals")
        axes[1].scatter([t["kl"] for t in r["trials"]], [t["refusals"] for t in r["trials"]], c=c, s=6, alpha=0.5,
                        label=f"{name} ({r['n_trials']} trials)")  # fmt: skip
        axes[1].step([t["kl"] for t in hf], [t["refusals"] for t in hf], where="post", c=c)
    if ours_h:
        of = _front(ours_h, "refusals")
        axes[1].scatter([o["kl"] for o in ours_h], [o["refusals"] for o in ours_h], c="#4c72b0", s=16, marker="D",
                        label="refusal-lens" + ("" if "n" in ours_h[0] else " (own judge)"))  # fmt: skip
        axes[1].step([o["kl"] for o in of], [o["refusals"] for o in of], where="post", c="#4c72b0")
    n = next(iter(runs.values()))["trials"][0]["n"] if runs else "?"
    axes[1].set(xlabel="KL (heretic's evaluator)", ylabel=f"refusals /{n}",
                title="heretic's evaluator, both tools")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
