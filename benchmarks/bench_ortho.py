"""Streaming orthogonalization: peak memory vs load-edit-save in memory, on a multi-shard checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import Result

_CHILD = r"""
import json, resource, sys, threading, time, torch
mode, src, out = sys.argv[1:4]
from refusal_lens.direction.orthogonalize import orthogonalize_checkpoint, orthogonalize_model
from transformers import AutoConfig, AutoModelForCausalLM

def anon_mb():  # anonymous resident memory: what the process allocated, not mapped file pages
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.005)
config = AutoConfig.from_pretrained(src)
with torch.device("meta"):  # import the modeling code before the baseline: both modes need it
    AutoModelForCausalLM.from_config(config)
base = anon_mb()
threading.Thread(target=sample, daemon=True).start()
d = torch.randn(config.hidden_size)
t = time.perf_counter()
if mode == "stream":
    orthogonalize_checkpoint(src, d, out)
else:
    m = AutoModelForCausalLM.from_pretrained(src)
    orthogonalize_model(m, d)
    m.save_pretrained(out)
seconds = time.perf_counter() - t
time.sleep(0.02)
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base_mb": base, "peak_mb": peak[0], "rss_peak_mb": rss_peak, "seconds": seconds}))
"""


def _run(mode: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def streaming_ortho_memory(quick: bool) -> Result:
    """Streaming's peak memory growth against its budget (2 x largest shard + constant), and vs in-memory."""
    from refusal_lens.testing import random_model

    # The checkpoint must be several times the memory budget (2 x largest shard + a constant) in both modes.
    d_model, layers = (1024, 12)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model = random_model("llama", n_layers=layers, d_model=d_model, n_heads=8, vocab=8000, bias=False)
        model.save_pretrained(src, max_shard_size="50MB")
        del model
        # Freshly written, still-dirty pages are counted in a reader's RSS when safetensors maps them;
        # flush them so the peak measures the editor's own memory, not the kernel's write-back.
        os.sync()
        shards = sorted(src.glob("*.safetensors"))
        largest = max(s.stat().st_size for s in shards) / 2**20
        total = sum(s.stat().st_size for s in shards) / 2**20
        stream = _run("stream", src, Path(tmp) / "s")
        memory = _run("memory", src, Path(tmp) / "m")
    grow_stream = stream["peak_mb"] - stream["base_mb"]
    grow_memory = memory["peak_mb"] - memory["base_mb"]
    const_mb = 150.0  # transformers' model skeleton on the meta device, imports done lazily, allocator slack
    details = {
        "checkpoint_mb": round(total, 1),
        "shards": len(shards),
        "largest_shard_mb": round(largest, 1),
        "stream_peak_growth_mb": round(grow_stream, 1),
        "in_memory_peak_growth_mb": round(grow_memory, 1),
        "stream_within_budget": grow_stream <= 2 * largest + const_mb,
        "stream_rss_peak_mb_incl_mapped_files": round(stream["rss_peak_mb"], 1),
        "stream_seconds": round(stream["seconds"], 2),
        "in_memory_seconds": round(memory["seconds"], 2),
        "budget_rule": f"peak anonymous-memory growth <= 2 x largest shard (read + edited copy) + {const_mb:.0f} MB",
    }
    # ratio = budget / streaming peak growth: >= 1 means streaming stayed within "largest shard + constant"
    budget = 2 * largest + const_mb
    details["budget_mb"] = round(budget, 1)
    details["in_memory_over_stream"] = round(grow_memory / max(grow_stream, 1.0), 2)
    ratio = budget / max(grow_stream, 1.0)
    return Result("streaming_ortho_memory", ratio, 1.0, [ratio], details)
