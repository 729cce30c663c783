"""Lee, Breck, Arditi 2025 (features upstream of refusal) on a real model, with a real-data SAE (issue #16).

    python scripts/lee_real.py --sae SAE_DIR --direction docs/results-16/table2-safe-direction --out results/lee

R = ⟨resid_pre[L][direction's position], r̂⟩ of the given direction (target layer L); the SAE sits at an earlier
layer l (its own). For the 20 held-out borderline prompts of ``organism/safety_prompts.py`` (never trained on):

1. upstream latents: per prompt, ∂R/∂resid[l] at every position (one backward pass) read through W_dec
   ("dot", mean over all positions, the paper's score; and the attribution f·(g·W_dec) over the instruction's
   tokens); the set's ranking is the mean of the per-prompt scores; per-prompt top latents and how often the
   set's top latent is in a prompt's own top 10;
2. the first-order check: for each prompt's own top latent, ΔR measured with α·W_dec[k] added at layer l at all
   prompt positions vs α·Σ_i g_i·W_dec[k] predicted, at α = c × the mean activation norm at l;
3. steering validation against random latents (``lens.validation.boundary_steering``): the set's top positive
   latent added on the prompts answered at baseline (expected to raise refusal), the top negative latent on the
   prompts refused at baseline (expected to lower it), at several multiples of each latent's mean firing
   activation, beside ``--controls`` random latents of the same size; the prompts are the 20 borderline prompts
   plus ``--n-harmful`` JailbreakBench prompts (so that the refused subset is not empty);
4. dashboards (top-activating prompts and tokens) of the latents found.

Writes ``lee.json`` and ``upstream_latents.safetensors`` (decoder rows of the latents found; small, for the tests).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from refusal_lens.core.data import load_prompts
from refusal_lens.core.io import atomic_save_safetensors, atomic_write_json, provenance, staging_dir
from refusal_lens.core.models import load_model, model_provenance
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.compute import Direction
from refusal_lens.lens.dashboards import latent_dashboards
from refusal_lens.lens.latents import sae_site
from refusal_lens.lens.pipeline import max_activation_per_prompt
from refusal_lens.lens.upstream import first_order_check, latent_scores, refusal_gradient
from refusal_lens.lens.validation import boundary_steering, latent_scales, mean_site_norm, refusals
from refusal_lens.organism.safety_prompts import BORDERLINE_TEST
from refusal_lens.sae.formats import load_sae

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


def top(scores: torch.Tensor, n: int, sign: int = 1) -> list[dict[str, float]]:
    order = torch.argsort(sign * scores, descending=True)[:n]
    return [{"latent": int(k), "score": float(scores[k])} for k in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-safe")
    ap.add_argument("--sae", required=True, help="SAE before the direction's layer")
    ap.add_argument("--direction", required=True)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--n-harmful", type=int, default=12, help="JailbreakBench prompts added for the steering test")
    ap.add_argument("--multiples", type=float, nargs="+", default=[4.0, 16.0])
    ap.add_argument("--controls", type=int, default=2, help="random latents per steering setting")
    ap.add_argument("--steer-readings", nargs="+", default=["dot_all"], help="readings whose top latents are steered")
    ap.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[0.003, 0.01, 0.03, 0.1],
        help="first-order check: α as a fraction of the mean activation norm at the SAE's site",
    )
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    model, tok = load_model(args.model)
    fmt = ChatFormatter(tok)
    sae = load_sae(args.sae)
    d = Direction.load(args.direction, model)
    layer, site = sae_site(sae)
    prompts = list(BORDERLINE_TEST)
    out: dict = {"source": {"layer": layer, "site": site}, "target": {"layer": d.layer, "position": d.position},
                 "prompts": prompts}  # fmt: skip
    # 1. upstream latents
    grads = [refusal_gradient(model, fmt, p, d.vector, d.layer, layer, site, d.position) for p in prompts]
    dot = torch.stack([latent_scores(g, sae, "dot", "mean", "all") for g in grads])
    attr = torch.stack([latent_scores(g, sae, "attribution", "mean", "instruction") for g in grads])
    out["R"] = [g.value for g in grads]
    readings = {}
    for name, per_prompt in (("dot_all", dot), ("attribution_instruction", attr)):
        mean = per_prompt.mean(0)
        pos, neg = top(mean, 10), top(mean, 10, -1)
        own_top10 = torch.argsort(per_prompt, dim=1, descending=True)[:, :10]
        readings[name] = {
            "positive": pos, "negative": neg,
            "per_prompt_top": [int(k) for k in per_prompt.argmax(1)],
            "set_top_in_prompt_top10": int((own_top10 == pos[0]["latent"]).any(1).sum()),
            "n_distinct_per_prompt_top": len(set(per_prompt.argmax(1).tolist())),
        }  # fmt: skip
        print(f"{name}: top + {pos[:3]}, top − {neg[:3]}; set top in {readings[name]['set_top_in_prompt_top10']}"
              f"/{len(prompts)} prompts' top 10", flush=True)  # fmt: skip
    out["upstream"] = readings
    # 2. first-order check on each prompt's own top latent (dot reading)
    norm = mean_site_norm(model, fmt, sae, prompts)
    rows = []
    for p, k in zip(prompts, readings["dot_all"]["per_prompt_top"]):
        rows.append({"prompt": p, "latent": k, "checks": first_order_check(
            model, fmt, p, d.vector, d.layer, sae, k, alphas=[a * norm for a in args.alphas],
            target_position=d.position)})  # fmt: skip
    summary = []
    for i, a in enumerate(args.alphas):
        pred = torch.tensor([r["checks"][i]["predicted"] for r in rows])
        meas = torch.tensor([r["checks"][i]["measured"] for r in rows])
        ratio = (meas / pred).median()
        corr = torch.corrcoef(torch.stack([pred, meas]))[0, 1]
        rel = ((meas - pred).abs() / pred.abs().clamp_min(1e-9)).median()
        summary.append({"alpha_over_norm": a, "alpha": a * norm, "median_measured_over_predicted": float(ratio),
                        "median_relative_error": float(rel), "pearson": float(corr),
                        "mean_predicted": float(pred.mean()), "mean_measured": float(meas.mean())})  # fmt: skip
        print(f"first order α={a}·|x|: measured/predicted median {ratio:.3f}, rel.err {rel:.3f}, r {corr:.3f}")
    out["first_order"] = {"site_norm": norm, "summary": summary, "per_prompt": rows}
    # 3. steering validation against random latents
    harmful = [p.instruction for p in load_prompts(Path(args.shared) / "processed" / "jailbreakbench.json",
                                                   n=args.n_harmful, seed=1)]  # fmt: skip
    harmless_ref = [p.instruction for p in load_prompts(Path(args.shared) / "splits" / "harmless_test.json",
                                                        n=64, seed=0)]  # fmt: skip
    reference = max_activation_per_prompt(model, fmt, sae, harmless_ref + harmful + prompts)
    boundary = prompts + harmful
    baseline = refusals(model, tok, fmt, boundary, None, args.max_new_tokens)
    out["baseline_refused"] = {"borderline": sum(baseline[: len(prompts)]), "harmful": sum(baseline[len(prompts):]),
                               "n_borderline": len(prompts), "n_harmful": len(harmful)}  # fmt: skip
    out["steering"] = {}
    for name in args.steer_readings:
        pair = [readings[name]["positive"][0]["latent"], readings[name]["negative"][0]["latent"]]
        out["steering"][name] = boundary_steering(
            model, tok, fmt, sae, d.vector, d.layer, boundary,
            [("top_positive", pair[0], "raise"), ("top_negative", pair[1], "lower")],
            latent_scales(reference, pair), multiples=args.multiples, n_controls=args.controls, seed=0,
            max_new_tokens=args.max_new_tokens, baseline=baseline, target_position=d.position,
        )  # fmt: skip
        for r in out["steering"][name]["rows"]:
            print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    # 4. dashboards
    found = list(dict.fromkeys(x["latent"] for r in readings.values() for x in r["positive"][:3] + r["negative"][:3]))
    out["dashboards"] = latent_dashboards(model, fmt, sae, found, harmless_ref + harmful + prompts)
    rows_t = {f"latent_{k}": sae.W_dec[k].detach().float().contiguous() for k in found}
    out["provenance"] = provenance(command="scripts/lee_real.py", options=vars(args),
                                   wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                                   **model_provenance(model))  # fmt: skip
    with staging_dir(args.out, overwrite=args.overwrite) as stage:
        atomic_save_safetensors(rows_t, stage / "upstream_latents.safetensors", {"layer": str(layer), "site": site})
        atomic_write_json(stage / "lee.json", out)
    print(f"wrote {args.out}/lee.json ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} CPU-s)")


if __name__ == "__main__":
    main()
