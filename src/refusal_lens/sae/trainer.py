"""One training loop for every SAE architecture, several SAEs per activation stream.

Per step: one batch of activations (scaled so that E||x|| = sqrt(d_in), the scale estimated once on a fresh
copy of the stream), then for each SAE: loss = reconstruction + warmed-up sparsity term + other aux terms,
backward, (data-parallel: average gradients over processes), architecture hook (remove the gradient
parallel to unit-norm decoder rows), gradient clipping, Adam with linear lr warm-up and linear decay over
the last ``lr_decay_frac`` of training, architecture hook (renormalise rows / clamp thresholds), and
dead-latent bookkeeping (standard SAEs resample dead latents periodically).

Checkpoints hold every SAE's state (buffers included), every optimizer, the stream position, the input
scale and the RNG states, so ``resume=True`` continues *exactly*: the final weights equal those of an
uninterrupted run. At the end the input scale is folded into the weights (see ``SAE.fold_input_scale``)
and each SAE is written in SAELens v6 format.

Data parallel: launch with ``torchrun --nproc_per_node N``; each process takes its slice of every global
batch, gradients and firing statistics are all-reduced, so N processes reproduce one process with the same
global batch (up to float summation order). Rank 0 writes all files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..core.config_args import at_least, fraction, in_range, positive
from ..core.errors import UserError
from ..core.progress import progress_bar
from .base import SAE, SAEConfig, reconstruction_loss
from .registry import create_sae
from .streams import RankSlice, Stream


@dataclass
class TrainConfig:
    """Optimisation settings (fields double as CLI help)."""

    tokens: int = field(default=2_000_000, metadata={**at_least(1), "help": "training tokens"})
    batch_size: int = field(
        default=4096, metadata={**at_least(1), "help": "tokens per step (global, over all processes)"}
    )
    lr: float | None = field(
        default=None,
        metadata={
            **positive(),
            "help": "Adam learning rate (default: 2e-4/sqrt(width/2^14) for topk/batchtopk, else 4e-4)",
        },
    )
    lr_warmup_frac: float = field(
        default=0.01, metadata={**fraction(), "help": "fraction of steps of linear lr warm-up"}
    )
    lr_decay_frac: float = field(
        default=0.2, metadata={**fraction(), "help": "fraction of final steps of linear lr decay to 0"}
    )
    penalty_warmup_frac: float = field(
        default=0.05,
        metadata={**fraction(), "help": "fraction of steps over which the sparsity penalty ramps up from 0"},
    )
    grad_clip: float = field(default=1.0, metadata={**at_least(0), "help": "gradient norm clip (0: off)"})
    beta1: float = field(default=0.9, metadata={**in_range(0, 1), "help": "Adam beta1"})
    beta2: float = field(default=0.999, metadata={**in_range(0, 1), "help": "Adam beta2"})
    normalize_inputs: bool = field(default=True, metadata={"help": "train on inputs scaled to E||x|| = sqrt(d)"})
    norm_batches: int = field(default=8, metadata={**at_least(1), "help": "batches used to estimate the input scale"})
    resample_every: int = field(
        default=0,
        metadata={**at_least(0), "help": "standard SAE: steps between dead-latent resamplings (0: dead_tokens/batch)"},
    )
    checkpoint_every: int = field(default=0, metadata={**at_least(0), "help": "steps between checkpoints (0: never)"})
    log_every: int = field(
        default=50, metadata={**at_least(1), "help": "steps between log lines / progress-bar updates"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the SAE initialisation and resampling"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def default_lr(sae: SAE) -> float:
    if sae.arch in ("topk", "batchtopk"):
        return 2e-4 / math.sqrt(sae.d_sae / 2**14)
    return 4e-4


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world).

    The backend is gloo also on GPU nodes: the SAEs, their gradients and every tensor this module all-reduces
    live on the CPU (only the model producing the activations runs on the GPUs), and NCCL cannot reduce CPU
    tensors.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return _world()


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group cleanly; exiting with gloo threads alive can abort the process (SIGABRT).

    ``barrier=False`` after an error: the other processes may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Trainer:
    """Trains ``saes`` (name -> SAE) on one stream; ``run()`` returns them with the input scale folded in."""

    def __init__(
        self,
        saes: dict[str, SAE],
        stream: Stream,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        if not saes:
            raise UserError("no SAE to train; pass at least one --arch.")
        for name, sae in saes.items():
            if sae.d_in != stream.d_in:
                raise UserError(f"SAE {name!r} has d_in {sae.d_in} but the activations have width {stream.d_in}.")
        self.rank, self.world = _world()
        self.saes, self.cfg = saes, cfg
        self.global_stream = stream
        self.stream = RankSlice(stream, self.rank, self.world) if self.world > 1 else stream
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metadata = metadata or {}
        self.n_steps = max(1, cfg.tokens // cfg.batch_size)
        if stream.batch_size != cfg.batch_size:
            raise UserError(f"stream batch size {stream.batch_size} differs from --batch-size {cfg.batch_size}.")
        self.opts = {
            n: torch.optim.Adam(s.parameters(), lr=cfg.lr or default_lr(s), betas=(cfg.beta1, cfg.beta2))
            for n, s in saes.items()
        }
        self.base_lr = {n: cfg.lr or default_lr(s) for n, s in saes.items()}
        self.gen = torch.Generator().manual_seed(cfg.seed + 12345)
        self.step = 0
        self.scale = 1.0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ schedules
    def lr_factor(self, step: int) -> float:
        warm = max(1, round(self.cfg.lr_warmup_frac * self.n_steps))
        f = min(1.0, (step + 1) / warm)
        decay_start = self.n_steps * (1 - self.cfg.lr_decay_frac)
        if self.cfg.lr_decay_frac > 0 and step >= decay_start:
            f *= max(0.0, (self.n_steps - step) / (self.n_steps - decay_start))
        return f

    def penalty_factor(self, step: int) -> float:
        warm = self.cfg.penalty_warmup_frac * self.n_steps
        return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)

    @torch.no_grad()
    def estimate_scale(self) -> float:
        """sqrt(d) / E||x|| over a few batches of a fresh copy of the stream (the same on every process)."""
        if not self.cfg.normalize_inputs:
            return 1.0
        probe = self.global_stream.fresh()
        norms = torch.cat([probe.next_batch().double().norm(dim=-1) for _ in range(self.cfg.norm_batches)])
        mean = float(norms.mean())
        if not math.isfinite(mean) or mean <= 0:
            raise UserError("the activations have zero or non-finite norm; check the model and --layer/--site.")
        return math.sqrt(self.global_stream.d_in) / mean

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "checkpoints" / "latest.pt"

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scale": self.scale,
            "saes": {n: s.state_dict() for n, s in self.saes.items()},
            "sae_cfgs": {n: s.cfg.to_dict() for n, s in self.saes.items()},
            "opts": {n: o.state_dict() for n, o in self.opts.items()},
            "stream": json.dumps(self.global_stream.state_dict()),
            "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state()},
            "history": json.dumps(self.history),
        }

    def save_checkpoint(self) -> None:
        if self.out_dir is not None and self.rank == 0:
            _atomic_torch_save(self.state(), self.checkpoint_path())

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path() if self.out_dir is not None else None
        if path is None or not path.is_file():
            return False
        try:
            st = torch.load(path, weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint {path} is unreadable ({exc}); delete it to start afresh.") from None
        if set(st["saes"]) != set(self.saes):
            raise UserError(f"checkpoint {path} holds SAEs {sorted(st['saes'])}, not {sorted(self.saes)}.")
        for n, s in self.saes.items():
            s.load_state_dict(st["saes"][n])
            self.opts[n].load_state_dict(st["opts"][n])
        self.step, self.scale = int(st["step"]), float(st["scale"])
        self.global_stream.load_state_dict(json.loads(st["stream"]))
        torch.set_rng_state(st["rng"]["torch"])
        self.gen.set_state(st["rng"]["gen"])
        self.history = json.loads(st["history"])
        return True

    # ------------------------------------------------------------------ the loop
    def _all_reduce_grads(self, sae: SAE) -> None:
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _train_one(self, name: str, sae: SAE, x: torch.Tensor, pen: float, lr_f: float) -> dict[str, Any]:
        opt = self.opts[name]
        sae.train()
        x_hat, f, aux = sae(x)
        recon = reconstruction_loss(x, x_hat)
        loss = recon + pen * aux.get("sparsity", recon.new_zeros(()))
        for key, term in aux.items():
            if key != "sparsity":
                loss = loss + term
        if not math.isfinite(loss.item()):
            raise UserError(
                f"SAE {name or sae.arch!r} diverged (loss {loss.item()}) at step {self.step}; "
                "lower --lr or --sparsity-coeff, or check the activations for NaN."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._all_reduce_grads(sae)
        sae.before_optimizer_step()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = self.base_lr[name] * lr_f
        opt.step()
        sae.after_optimizer_step()
        with torch.no_grad():
            # One pass over the dense [batch, width] latents for all statistics (each extra comparison or
            # bool->int reduction of it cost as much as the sparse TopK decoder). count_nonzero gives the
            # same integers as (f > 0).sum(0) without materialising an int64 copy.
            fires = torch.count_nonzero(f > 0, dim=0)
            fired = fires > 0
            if self.world > 1:
                as_int = fired.to(torch.int32)
                dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
                fired = as_int.bool()
                for buf in getattr(sae, "averaged_buffers", ()):
                    t = getattr(sae, buf)
                    dist.all_reduce(t)
                    t /= self.world
            sae.record_firing(fired, self.cfg.batch_size)
            if hasattr(sae, "resample_dead"):
                every = self.cfg.resample_every or max(1, sae.cfg.dead_tokens // self.cfg.batch_size)
                if (self.step + 1) % every == 0 and self.step + 1 < self.n_steps * (1 - self.cfg.lr_decay_frac):
                    sae.resample_dead(x, opt, self.gen)
                    if self.world > 1:  # rank 0's choice wins; optimizer resets are identical everywhere
                        for p in sae.parameters():
                            dist.broadcast(p.data, 0)
            err = (x - x_hat).pow(2).sum()
            var = (x - x.mean(0)).pow(2).sum()
            return {
                "loss": loss.item(),
                "fvu": float(err / var.clamp_min(1e-12)),
                # = (f > 0).sum(-1).float().mean(): CPU mean is an exact integer sum, then a division
                "l0": float(fires.sum().float() / f.shape[0]),
                "fires": fires,
            }

    def run(self, resume: bool = False, max_steps: int | None = None) -> dict[str, SAE]:
        """Train to the end (or ``max_steps`` steps, for interruption tests); returns scale-folded copies."""

        if not (resume and self.load_checkpoint()):
            self.scale = self.estimate_scale()
        bar = progress_bar(
            total=self.n_steps,
            initial=self.step,
            disable=not self.cfg.progress or self.rank != 0,
            desc="sae",
            unit="step",
            dynamic_ncols=True,
        )
        window: dict[str, dict[str, Any]] = {}
        stop = self.n_steps if max_steps is None else min(self.n_steps, self.step + max_steps)
        while self.step < stop:
            x = self.stream.next_batch() * self.scale
            pen, lr_f = self.penalty_factor(self.step), self.lr_factor(self.step)
            for name, sae in self.saes.items():
                r = self._train_one(name, sae, x, pen, lr_f)
                w = window.setdefault(name, {"n": 0, "fvu": 0.0, "l0": 0.0, "loss": 0.0, "fires": 0})
                w["n"] += 1
                w["fvu"] += r["fvu"]
                w["l0"] += r["l0"]
                w["loss"] += r["loss"]
                w["fires"] = w["fires"] + r["fires"]
            self.step += 1
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.n_steps:
                self._log(window, bar)
                window = {}
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.step < self.n_steps:  # interrupted on purpose: leave a checkpoint to resume from
            self.save_checkpoint()
            return self.saes
        return self.finish()

    def _log(self, window: dict[str, dict[str, Any]], bar: Any) -> None:
        row: dict[str, Any] = {"step": self.step, "tokens": self.step * self.cfg.batch_size}
        postfix = {}
        for name, w in window.items():
            sae = self.saes[name]
            n_tok = w["n"] * self.stream.batch_size
            dense = float((w["fires"].float() / n_tok > 0.1).float().mean())
            dead = float(sae.dead_mask().float().mean())
            row[name or "sae"] = {
                "loss": w["loss"] / w["n"],
                "fvu": w["fvu"] / w["n"],
                "l0": w["l0"] / w["n"],
                "dead_frac": dead,
                "dense_frac": dense,
            }
            tag = f"{name}:" if name else ""
            postfix[f"{tag}L0"] = f"{w['l0'] / w['n']:.1f}"
            postfix[f"{tag}FVU"] = f"{w['fvu'] / w['n']:.3f}"
            postfix[f"{tag}dead"] = f"{100 * dead:.0f}%"
        self.history.append(row)
        bar.set_postfix(postfix, refresh=False)

    def finish(self) -> dict[str, SAE]:
        """Fold the input scale into copies of the SAEs, save them (rank 0) and return them."""
        from ..core.io import atomic_write_text
        from .formats import save_saelens

        out: dict[str, SAE] = {}
        for name, sae in self.saes.items():
            final = copy.deepcopy(sae).eval()
            final.fold_input_scale(self.scale)
            out[name] = final
            if self.out_dir is not None and self.rank == 0:
                folder = self.out_dir / name if len(self.saes) > 1 else self.out_dir
                meta = dict(
                    self.metadata,
                    input_scale_folded=self.scale,
                    train_config=self.cfg.__dict__,
                    sae_config=sae.cfg.to_dict(),
                )
                save_saelens(final, folder, meta)
                lines = [json.dumps(r | {"sae": name}) for r in self.history]
                atomic_write_text(folder / "training_log.jsonl", "\n".join(lines) + "\n")
        return out


def train_saes(
    sae_cfgs: dict[str, SAEConfig],
    stream: Stream,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, SAE]:
    """Build SAEs from configs (same seed on every process) and train them all on ``stream``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    saes = {}
    for name, c in sae_cfgs.items():
        c.d_in = c.d_in or stream.d_in
        saes[name] = create_sae(c, gen)
    return Trainer(saes, stream, cfg, out_dir, metadata).run(resume=resume)
