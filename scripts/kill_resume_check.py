"""kill -9 streaming ``orthogonalize`` at random points (10 times) and ``evaluate`` once, rerun, check (issue #14).

After every kill the same command is run again on the same ``--out``. The rerun must succeed, its folder
must be byte-identical to an uninterrupted run's (``SOURCE_DATE_EPOCH`` pins the provenance time), and
nothing may be left beside ``--out`` (no ``.out.partial-*`` or ``.out.old-*``). ``evaluate`` is rerun with
``--resume`` and must reuse the batches of replies made before the kill.

The model is the built-in organism saved in small shards, so a kill can land between shards. Half the kills
are at a random time of the whole run, half at a random time after the staging folder appeared.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/kill_resume_check.py [--trials 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-c", "import sys; from refusal_lens.cli.main import main; sys.exit(main(sys.argv[1:]))"]
if shutil.which("refusal-lens"):
    CLI = ["refusal-lens"]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], cwd=cwd, env=ENV, capture_output=True, text=True)


def kill_at(argv: list[str], cwd: Path, out: Path, delay: float, after_stage: bool) -> tuple[float, bool]:
    """Start the command, kill -9 it ``delay`` s after start (or after its staging folder appears)."""
    proc = subprocess.Popen([*CLI, *argv], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    if after_stage:
        stage = out.parent / f".{out.name}.partial-{proc.pid}"
        while not stage.exists() and proc.poll() is None:
            time.sleep(0.01)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - start, finished


def sharded_organism(dest: Path) -> Path:
    from refusal_lens.core.models import load_model

    model, tok = load_model()
    model.save_pretrained(dest, max_shard_size="300KB")  # many shards: kills can land between them
    tok.save_pretrained(dest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from refusal_lens.organism import shipped_direction

    direction = str(shipped_direction())
    failures = 0
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        work = Path(tmp)
        model = sharded_organism(work / "model")
        n_shards = len(list(model.glob("*.safetensors")))
        out = work / "ortho"
        ortho = ["orthogonalize", "--model", str(model), "--direction", direction, "--out", str(out), "--overwrite"]
        t0 = time.perf_counter()
        ref = run(ortho, work)
        total = time.perf_counter() - t0
        assert ref.returncode == 0, ref.stderr
        want = digest(out)
        shutil.rmtree(out)
        # how long the staging folder lives in an uninterrupted run (the window for the second kind of kill)
        proc = subprocess.Popen([*CLI, *ortho], cwd=work, env=ENV, stdout=subprocess.DEVNULL)
        stage = work / f".ortho.partial-{proc.pid}"
        while not stage.exists() and proc.poll() is None:
            time.sleep(0.005)
        t1 = time.perf_counter()
        while stage.exists():
            time.sleep(0.005)
        stream = time.perf_counter() - t1
        proc.wait()
        shutil.rmtree(out)
        print(
            f"orthogonalize: {n_shards} shards, uninterrupted run {total:.1f} s (staging folder alive {stream:.2f} s), "
            f"{len(want)} files"
        )
        for trial in range(args.trials):
            after_stage = trial % 2 == 1
            delay = rng.uniform(0, stream) if after_stage else rng.uniform(0.2, total)
            waited, finished = kill_at(ortho, work, out, delay, after_stage)
            left = leftovers(out)
            done = out.exists()
            again = run(ortho, work)
            ok = again.returncode == 0 and digest(out) == want and not leftovers(out)
            failures += not ok
            when = f"{delay:.2f} s after the staging folder appeared" if after_stage else f"at {waited:.2f} s"
            print(
                f"  trial {trial + 1:2d}: kill -9 {when}{' (had already exited)' if finished else ''}; "
                f"--out {'complete' if done else 'absent'}, left behind: {left or 'nothing'}; "
                f"rerun: exit {again.returncode}, "
                f"{'identical to the uninterrupted run' if ok else 'DIFFERENT'}, "
                f"leftovers after rerun: {leftovers(out) or 'none'}"
            )
            if again.returncode != 0:
                print(again.stderr[-2000:])
            shutil.rmtree(out, ignore_errors=True)

        ev_out = work / "eval"
        ev = ["evaluate", "--direction", direction, "--n-prompts", "8", "--max-new-tokens", "24", "--batch-size", "2",
              "--n-ce", "4", "--no-report", "--quiet", "--out", str(ev_out)]  # fmt: skip
        t0 = time.perf_counter()
        ref = run(ev, work)
        total = time.perf_counter() - t0
        assert ref.returncode == 0, ref.stderr
        want = digest(ev_out)
        shutil.rmtree(ev_out)
        print(f"evaluate: uninterrupted run {total:.1f} s, {len(want)} files")
        proc = subprocess.Popen([*CLI, *ev], cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = work / f".eval.partial-{proc.pid}" / "completions.jsonl"
        batches = rng.randint(3, 20)  # of 4 conditions x 3 sets x 4 batches = 48
        while proc.poll() is None and (not journal.exists() or journal.read_text().count("\n") < 1 + batches):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        made = journal.read_text().count("\n") - 1 if journal.exists() else 0
        left = leftovers(ev_out)
        again = run([*ev, "--resume"], work)
        ok = again.returncode == 0 and digest(ev_out) == want and not leftovers(ev_out)
        failures += not ok
        resumed = next((ln for ln in again.stdout.splitlines() if ln.startswith("resuming")), "no resume line")
        print(
            f"  kill -9 after {made} journaled batches; left behind: {left}; rerun with --resume: exit "
            f"{again.returncode}, '{resumed}', {'identical to the uninterrupted run' if ok else 'DIFFERENT'}, "
            f"leftovers after rerun: {leftovers(ev_out) or 'none'}"
        )
        if again.returncode != 0:
            print(again.stderr[-2000:])
    print("ALL OK" if failures == 0 else f"{failures} FAILURE(S)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
