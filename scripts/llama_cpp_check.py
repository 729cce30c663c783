"""Run a GGUF model that refusal-lens wrote (`OUT/model.gguf`) in llama.cpp itself, beside transformers.

llama-cpp-python is an ~8-minute C++ build, so it lives in its own environment (here the native build died with
"Illegal instruction"; CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" works); this script
runs in both:

    python scripts/llama_cpp_check.py hf --original smollm2 --edited OUT --out hf.npz          # refusal-lens env
    LLAMA_PY scripts/llama_cpp_check.py llama --original F.gguf --edited OUT/model.gguf \\
        --ids hf.npz --out llama.npz                                                          # llama-cpp-python env
    python scripts/llama_cpp_check.py compare hf.npz llama.npz

Both sides see the same token ids (chat-formatted JailbreakBench and Alpaca test prompts), so tokenizers do not
enter. llama.cpp multiplies the untouched Q4_1 tensors with 8-bit-quantized activations, so its logits are not
transformers' to 1e-4 even for the original file; the check is whether the *edited* file behaves in llama.cpp as
the edited checkpoint does in transformers, measured against that same baseline: next-token logits, the top token,
the edit's effect (edited − original), and greedy continuations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"
N_NEW = 24


def _prompts(n: int) -> list[str]:
    rows = json.loads((SPLITS / "processed" / "jailbreakbench.json").read_text())[:n]
    rows += json.loads((SPLITS / "splits" / "harmless_test.json").read_text())[:n]
    return [r["instruction"] for r in rows]


def cmd_hf(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from refusal_lens import load_model
    from refusal_lens.core.prompts import ChatFormatter

    torch.set_num_threads(1)
    original, tok = load_model(args.original)
    edited = AutoModelForCausalLM.from_pretrained(args.edited, dtype=torch.float32).eval()
    fmt = ChatFormatter(tok)
    eos = original.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = [fmt.token_ids(p) for p in _prompts(args.n)]
    out = {"lengths": np.array([len(x) for x in ids])}
    out["ids"] = np.concatenate([np.array(x) for x in ids])
    for name, model in (("original", original), ("edited", edited)):
        logits, greedy = [], []
        with torch.no_grad():
            for x in ids:
                t = torch.tensor([x])
                logits.append(model(t).logits[0, -1].float().numpy())
                g = model.generate(t, max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(t))
                new = g[0, len(x) :].tolist()
                stop = next((i for i, v in enumerate(new) if v in eos), len(new))  # llama.cpp's side stops before it
                greedy.append(np.array((new[:stop] + [-1] * N_NEW)[:N_NEW]))
        out[f"{name}_logits"], out[f"{name}_greedy"] = np.stack(logits), np.stack(greedy)
    np.savez(args.out, **out)
    print(f"wrote {args.out}: {len(ids)} prompts")


def cmd_llama(args) -> None:
    from llama_cpp import Llama

    data = np.load(args.ids)
    bounds = np.cumsum(np.concatenate([[0], data["lengths"]]))
    ids = [data["ids"][a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    out = {}
    for name, path in (("original", args.original), ("edited", args.edited)):
        llm = Llama(model_path=path, n_ctx=512, n_threads=1, n_batch=512, logits_all=True, verbose=False)
        logits, greedy = [], []
        for x in ids:
            llm.reset()
            llm.eval(x)
            logits.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
            new = []
            for _ in range(N_NEW):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if nxt == llm.token_eos():
                    break
                new.append(nxt)
                llm.eval([nxt])
            greedy.append(np.array((new + [-1] * N_NEW)[:N_NEW]))
        out[f"{name}_logits"], out[f"{name}_greedy"] = np.stack(logits), np.stack(greedy)
    np.savez(args.out, **out)
    print(f"wrote {args.out}")


def cmd_compare(args) -> None:
    hf, ll = np.load(args.hf), np.load(args.llama)
    rows = {}
    for name in ("original", "edited"):
        a, b = hf[f"{name}_logits"], ll[f"{name}_logits"][:, : hf[f"{name}_logits"].shape[1]]
        rows[name] = {
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "median_abs_logit_diff": float(np.median(np.abs(a - b))),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "greedy_identical": float((hf[f"{name}_greedy"] == ll[f"{name}_greedy"]).all(-1).mean()),
        }
    effect_hf = hf["edited_logits"] - hf["original_logits"]
    effect_ll = ll["edited_logits"][:, : effect_hf.shape[1]] - ll["original_logits"][:, : effect_hf.shape[1]]
    rows["edit_effect"] = {
        "correlation": float(np.corrcoef(effect_hf.ravel(), effect_ll.ravel())[0, 1]),
        "max_abs_diff": float(np.abs(effect_hf - effect_ll).max()),
        "size_max_abs": float(np.abs(effect_hf).max()),
    }
    print(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["hf", "llama", "compare"])
    p.add_argument("files", nargs="*", help="compare: HF.npz LLAMA.npz")
    p.add_argument("--original", help="hf: the model refusal-lens read (e.g. smollm2); llama: its .gguf file")
    p.add_argument("--edited", help="hf: the written checkpoint folder; llama: its model.gguf")
    p.add_argument("--ids", help="llama: the hf step's .npz")
    p.add_argument("--out")
    p.add_argument("--n", type=int, default=8, help="hf: JailbreakBench and Alpaca test prompts each")
    args = p.parse_args()
    if args.step == "compare":
        args.hf, args.llama = args.files
    {"hf": cmd_hf, "llama": cmd_llama, "compare": cmd_compare}[args.step](args)


if __name__ == "__main__":
    main()
