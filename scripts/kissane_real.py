"""Kissane et al. 2024 ("SAEs are highly dataset dependent") on a real model: chat-data vs text-data SAEs (issue #16).

Two steps around two ``refusal-lens sae train`` runs (the whole sequence is ``scripts/kissane_real.sh``):

``data``     wrap the plain-text corpus in the chat format, as the paper wraps the Pile ("instruction formatting"):
             each paragraph becomes a one-turn conversation (user = the paragraph, empty assistant turn), so
             both SAEs see the same template tokens, and only what fills them differs; 64 seeded documents of
             each corpus are held out (``*_heldout.json``) for the SAE metrics.
``measure``  for each SAE, the paper's measurements at the SAE's layer, last template token (or ``--position``):

* the refusal direction r = mean(harmful) − mean(harmless) of ``--n`` held-out prompts each (the shared
  ``harmful_test`` / ``harmless_test`` splits, seeded sample; paper: 64 AdvBench vs 64 Alpaca);
* reconstruction: cos(r, r_SAE) with r_SAE = Δf̄·W_dec, and ‖r_SAE − r‖²/‖r‖² (paper: 0.849 chat vs 0.596 Pile);
* the single most aligned latent: max_k cos(W_dec[k], r) (paper: 0.678 vs 0.411);
* the sparsity curve: relative error of the least-squares fit of r from the top-k latents by |Δf̄| (and OMP);
* latent ablation: greedy refusal rate on ``--n-ablate`` JailbreakBench prompts with each SAE's most aligned latent
  ablated at every layer (like r itself), next to no ablation and to ablating r (the train-split direction);
* standard SAE metrics of each SAE on the held-out documents of both corpora (L0, FVU, dead/dense latents).

Writes ``kissane.json``, ``direction/`` (the train-split direction at the SAE's layer and position),
``top_latents.safetensors`` (the most aligned decoder rows, small, for the real-model tests) and
``decomposition.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from refusal_lens.core.data import load_prompts
from refusal_lens.core.io import atomic_save_safetensors, atomic_write_json, provenance, staging_dir
from refusal_lens.core.models import load_model, model_provenance
from refusal_lens.core.prompts import ChatFormatter
from refusal_lens.direction.activations import mean_activations
from refusal_lens.direction.compute import Direction
from refusal_lens.direction.interventions import ablate_direction
from refusal_lens.direction.scoring import is_refusal_text
from refusal_lens.evaluation.generation import GenerationSettings, generate
from refusal_lens.lens.decompose import decompose_direction, latents_for_error
from refusal_lens.lens.latents import ablate_latent, sae_site
from refusal_lens.sae.evaluate import EvalConfig, evaluate_sae
from refusal_lens.sae.formats import load_sae
from refusal_lens.sae.source import ActivationSource, DataConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


def split_data(args: argparse.Namespace) -> None:
    """Chat-wrap the paragraphs; hold out ``--holdout`` seeded documents of each corpus for the SAE metrics."""
    paragraphs = [r["text"] if isinstance(r, dict) else str(r) for r in json.loads(Path(args.plain_text).read_text())]
    chats = json.loads(Path(args.chat).read_text())
    corpora = {
        "text": [{"instruction": p, "reply": ""} for p in paragraphs],
        "chat": [{"instruction": r["instruction"], "reply": r["reply"]} for r in chats],
    }
    out = Path(args.out_dir)
    for name, records in corpora.items():
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
        held = set(order[: args.holdout])
        atomic_write_json(out / f"{name}_train.json", [r for i, r in enumerate(records) if i not in held])
        atomic_write_json(out / f"{name}_heldout.json", [r for i, r in enumerate(records) if i in held])
        print(f"{name}: {len(records) - len(held)} training documents, {len(held)} held out")


def refusal_rate(model, tok, fmt, prompts, factory, max_new_tokens: int) -> tuple[float, list[str]]:
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    comps = generate(model, tok, prompts, factory, settings, formatter=fmt, progress=False)
    texts = [c.completion for c in comps]
    return sum(is_refusal_text(t) for t in texts) / len(texts), texts


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    model, tok = load_model(args.model)
    fmt = ChatFormatter(tok)
    saes = {name: load_sae(path) for name, path in zip(args.names, args.sae)}
    layer, site = sae_site(next(iter(saes.values())))
    if any(sae_site(s) != (layer, site) for s in saes.values()):
        raise SystemExit("all SAEs must read the same layer and site")
    splits = Path(args.shared) / "splits"
    # the direction that is ablated: the paper's recipe (128 train prompts each), at the SAE's layer and position
    h_train = [p.instruction for p in load_prompts(splits / "harmful_train.json", n=128, seed=0)]
    b_train = [p.instruction for p in load_prompts(splits / "harmless_train.json", n=128, seed=0)]
    n_pos = -args.position
    mh = mean_activations(model, fmt, h_train, n_positions=n_pos, progress=False)
    mb = mean_activations(model, fmt, b_train, n_positions=n_pos, progress=False)
    vector = (mh - mb)[0, layer].float()  # slot 0 of the last n_pos positions = position -n_pos
    direction = Direction(vector, layer, args.position, meta={"prompts": "harmful_train/harmless_train, 128 each"})
    harmful = [p.instruction for p in load_prompts(splits / "harmful_test.json", n=args.n, seed=0)]
    harmless = [p.instruction for p in load_prompts(splits / "harmless_test.json", n=args.n, seed=0)]
    out: dict = {"layer": layer, "site": site, "position": args.position, "n_prompts": args.n, "saes": []}
    for name, sae in saes.items():
        dec = decompose_direction(model, fmt, sae, harmful, harmless, args.position, vector, name, max_k=args.max_k)
        row = dec.to_json() | {"latents_for_half_error": latents_for_error(dec.sparsity_curve, 0.5)}
        out["saes"].append(row)
        print(f"{name}: cos {dec.cosine:.3f}, rel.err {dec.relative_error:.3f}, best latent "
              f"{dec.max_single_latent_cosine:.3f} (#{dec.top_latents[0]['latent']})", flush=True)  # fmt: skip
    # standard metrics of each SAE on each data set (the cross terms show what each SAE misses)
    out["sae_metrics"] = []
    for name, sae in saes.items():
        for data_name, data_file in zip(args.names, args.data_file):
            cfg = DataConfig(data="chat", data_file=data_file, context_size=args.context_size, seed=1)
            src = ActivationSource(model, tok, layer, site, cfg, batch_size=1024)
            m = evaluate_sae(sae, src, EvalConfig(tokens=args.eval_tokens, batch_size=1024, ce_docs=0))
            metrics = {k: v for k, v in m.items() if k != "warnings"}
            out["sae_metrics"].append({"sae": name, "data": data_name} | metrics)
            print(f"{name} SAE on {data_name} data: {out['sae_metrics'][-1]}", flush=True)
    # latent ablation (the paper's steering test), on held-out JailbreakBench prompts
    jbb = [p.instruction for p in load_prompts(Path(args.shared) / "processed" / "jailbreakbench.json",
                                               n=args.n_ablate, seed=0)]  # fmt: skip
    conditions = {"none": None, "direction": lambda: ablate_direction(model, vector)}
    for row in out["saes"]:
        k = row["top_latents"][0]["latent"]
        conditions[f"{row['name']}_latent_{k}"] = lambda s=saes[row["name"]], k=k: ablate_latent(model, s, k)
    out["latent_ablation"] = {"n": len(jbb), "max_new_tokens": args.max_new_tokens, "rates": {}, "examples": {}}
    for cname, factory in conditions.items():
        rate, texts = refusal_rate(model, tok, fmt, jbb, factory, args.max_new_tokens)
        out["latent_ablation"]["rates"][cname] = rate
        out["latent_ablation"]["examples"][cname] = texts[:3]
        print(f"ablation {cname}: harmful refusal {rate:.3f}", flush=True)
    top = {f"{r['name']}_top": saes[r["name"]].W_dec[r["top_latents"][0]["latent"]].detach().float().contiguous()
           for r in out["saes"]}  # fmt: skip
    options = {k: v for k, v in vars(args).items() if k != "run"}  # run: the step's function
    out["provenance"] = provenance(command="scripts/kissane_real.py measure", options=options,
                                   wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                                   **model_provenance(model))  # fmt: skip
    with staging_dir(args.out, overwrite=args.overwrite) as stage:
        direction.save(stage / "direction")
        atomic_save_safetensors(top, stage / "top_latents.safetensors", {"layer": str(layer), "site": site})
        atomic_write_json(stage / "kissane.json", out)
        from refusal_lens.report.lens import decomposition_figure

        (stage / "decomposition.png").write_bytes(decomposition_figure(out["saes"]))
    print(f"wrote {args.out}/kissane.json ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} CPU-s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    d = sub.add_parser("data", help="wrap plain-text paragraphs in the chat format; hold out documents")
    d.add_argument("--plain-text", required=True, help="JSON of {'text'} records (scripts/plain_text_corpus.py)")
    d.add_argument("--chat", required=True, help="JSON of {'instruction', 'reply'} records (scripts/chat_corpus.py)")
    d.add_argument("--holdout", type=int, default=64, help="documents of each corpus kept out of training")
    d.add_argument("--out-dir", required=True)
    d.set_defaults(run=split_data)
    m = sub.add_parser("measure", help="decomposition, latent ablation and SAE metrics")
    m.add_argument("--model", default="smollm2-safe")
    m.add_argument("--sae", action="append", required=True, help="SAE folder (repeat; same layer)")
    m.add_argument("--names", nargs="+", default=["chat", "text"])
    m.add_argument(
        "--data-file",
        action="append",
        required=True,
        help="held-out documents of each SAE's corpus (SAE metrics), in --names order",
    )
    m.add_argument("--position", type=int, default=-1)
    m.add_argument("--shared", default=str(SHARED))
    m.add_argument("-n", type=int, default=64, help="prompts of each kind for r (paper: 64)")
    m.add_argument("--max-k", type=int, default=512)
    m.add_argument("--n-ablate", type=int, default=32, help="JailbreakBench prompts for latent ablation")
    m.add_argument("--max-new-tokens", type=int, default=48)
    m.add_argument("--eval-tokens", type=int, default=16384)
    m.add_argument("--context-size", type=int, default=256)
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(run=measure)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
