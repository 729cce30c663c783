"""FVU / L0 / CE-recovered of every SAE architecture trained on one activation stream.

    python scripts/sae_arch_table.py [--model DIR] [--tokens N] [--width M] [--json OUT]

Uses the organism checkpoint when it exists (else a random-init 4-layer Llama, d_model 64, with the toy
tokenizer), the organism corpus as a 50/50 chat/text mix, resid_pre of the middle layer. Activations are
cached once (safetensors shards) and all six SAEs train together on the same batches; evaluation uses
held-out documents (after the training ones) and splices each SAE into the model for CE-loss recovered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from refusal_lens.sae import (  # noqa: E402
    ARCHITECTURES,
    ActivationSource,
    CachedStream,
    DataConfig,
    EvalConfig,
    SAEConfig,
    TrainConfig,
    Trainer,
    create_sae,
    evaluate_sae,
    write_activation_cache,
)


def load(model_arg: str | None) -> tuple[torch.nn.Module, object, str]:
    from refusal_lens.core.errors import UserError
    from refusal_lens.core.models import load_model

    try:
        model, tok = load_model(model_arg)
        return model, tok, model_arg or "organism"
    except UserError:
        if model_arg:
            raise
    from refusal_lens.testing import random_model, toy_tokenizer

    return random_model("llama", n_layers=4, d_model=64, vocab=300), toy_tokenizer(), "random-init llama 4x64"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=600 * 1024)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    p.add_argument("--bandwidth", type=float, default=1e-3, help="JumpReLU straight-through bandwidth")
    p.add_argument("--coeff-scale", type=float, default=1.0, help="multiply every default sparsity coefficient")
    p.add_argument("--init-threshold", type=float, default=None, help="initial JumpReLU threshold (default: auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, name = load(args.model)
    from refusal_lens.core.adapters import get_adapter

    layer = max(1, get_adapter(model).n_layers // 2)
    data = DataConfig(data="mix:0.5", context_size=128, model_batch_size=32, buffer_tokens=32_768)
    source = ActivationSource(model, tok, layer, "resid_pre", data, args.batch_size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_activation_cache(source, Path(tmp) / "cache", args.tokens, metadata=source.describe())
        cache_s = time.perf_counter() - t0
        stream = CachedStream(Path(tmp) / "cache", args.batch_size)
        g = torch.Generator().manual_seed(0)
        dead = args.tokens // 4
        saes = {}
        for a in args.archs.split(","):
            c = SAEConfig(arch=a, d_in=source.d_in, width=args.width, k=args.k, dead_tokens=dead)
            c.init_threshold, c.bandwidth = args.init_threshold, args.bandwidth
            probe = create_sae(c)
            c.sparsity_coeff = probe.sparsity_coeff * args.coeff_scale
            saes[a] = create_sae(c, g)
        cfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, progress=True, log_every=50)
        t1 = time.perf_counter()
        trained = Trainer(saes, stream, cfg).run()
        train_s = time.perf_counter() - t1
    rows = []
    for arch, sae in trained.items():
        held_out = source.fresh()
        held_out.load_state_dict({"chunk_start": None, "next_doc": source.state_dict()["next_doc"]})
        m = evaluate_sae(sae, held_out, EvalConfig(tokens=32_768, batch_size=4096, ce_docs=64))
        rows.append(
            {
                "arch": arch,
                **{
                    k: m[k]
                    for k in (
                        "l0",
                        "fvu",
                        "cosine",
                        "shrinkage",
                        "dead_frac",
                        "ce_recovered_zero",
                        "ce_recovered_mean",
                        "delta_loss",
                    )
                },
            }
        )
    header = f"model: {name}, layer {layer} resid_pre, d={source.d_in}, width {args.width}, k {args.k}, "
    header += f"coeff x{args.coeff_scale}, jumprelu theta0 {args.init_threshold} eps {args.bandwidth}, "
    header += f"{args.tokens} tokens (cache {cache_s:.0f}s, training all six together {train_s:.0f}s)"
    print(header)
    cols = ("L0", "FVU", "cos", "shrink", "dead", "CErec0", "CErecM", "dLoss")
    print(f"{'arch':<10} " + " ".join(f"{c:>7}" for c in cols))
    for r in rows:
        print(
            f"{r['arch']:<10} {r['l0']:7.1f} {r['fvu']:7.3f} {r['cosine']:6.3f} {r['shrinkage']:7.3f} "
            f"{r['dead_frac']:6.2f} {r['ce_recovered_zero']:7.3f} {r['ce_recovered_mean']:7.3f} {r['delta_loss']:7.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
