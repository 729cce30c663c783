"""Data-parallel training (torchrun, 2 CPU processes, gloo) reproduces one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two interpreter start-ups and a gloo process group: ~9 s on 2 idle cores, ~16 s on a busy box.
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)

HERE = Path(__file__).parent


def test_two_processes_match_one(tmp_path):
    from tests.sae.ddp_worker import train

    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    with socket.socket() as sock:  # a free port, so concurrent runs on one machine cannot collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd = [*launcher, "--master_addr", "127.0.0.1", "--master_port", str(port), str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    single = train()
    for name, state in single.items():
        for key, value in state.items():
            other = ddp["saes"][name][key]
            if value.dtype.is_floating_point:
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
            else:
                assert torch.equal(other, value), f"{name}.{key}"
