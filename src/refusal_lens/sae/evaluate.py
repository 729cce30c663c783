"""SAE evaluation: reconstruction statistics on a stream and LM loss with the SAE spliced into the model.

Reconstruction (sums accumulated in float64 over ``tokens`` activations):

* L0 = mean number of active latents per token; MSE = E||x - x_hat||^2 (summed over d, per token);
* FVU = E||x - x_hat||^2 / E||x - E x||^2; cosine = E cos(x, x_hat);
* shrinkage gamma = E||x_hat||^2 / E[x . x_hat] (< 1: the SAE under-shoots, the L1 signature);
* dead fraction = latents that never fire in the window; dense fraction = latents firing on > 10 % of tokens.

LM loss (next-token cross-entropy over the real tokens of ``ce_docs`` documents): clean, with the site's
activation replaced by the SAE reconstruction, by zeros, and by the mean activation. Replacement happens
only at the tokens the SAE was trained on (BOS, padding, special tokens and outliers keep their activation,
as in training). CE recovered = (L_ablated - L_sae) / (L_ablated - L_clean) for both ablations, and
Δ loss = L_sae - L_clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.config_args import at_least, fraction
from .base import SAE
from .source import ActivationSource, drop_outliers, tokenize_docs
from .streams import Stream


@dataclass
class EvalConfig:
    """What to evaluate on (fields double as CLI help)."""

    tokens: int = field(default=65_536, metadata={**at_least(1), "help": "activations for the reconstruction metrics"})
    batch_size: int = field(default=4096, metadata={**at_least(1), "help": "activations per evaluation batch"})
    ce_docs: int = field(default=64, metadata={**at_least(0), "help": "documents for the LM-loss metrics (0: skip)"})
    dense_threshold: float = field(
        default=0.1, metadata={**fraction(), "help": "firing rate above which a latent is dense"}
    )


@torch.no_grad()
def reconstruction_metrics(sae: SAE, stream: Stream, tokens: int, dense_threshold: float = 0.1) -> dict[str, Any]:
    """Reconstruction statistics of ``sae`` on ``tokens`` activations of ``stream`` (see module docstring)."""
    sae.eval()
    n = 0
    s_err = s_x2 = s_l0 = s_cos = s_xh2 = s_dot = 0.0
    s_x = torch.zeros(stream.d_in, dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    while n < tokens:
        x = stream.next_batch()
        f = sae.encode(x)
        x_hat = sae.decode(f)
        x64, xh64 = x.double(), x_hat.double()
        active = f > 0
        n += x.shape[0]
        s_err += float((x64 - xh64).pow(2).sum())
        s_x += x64.sum(0)
        s_x2 += float(x64.pow(2).sum())
        s_l0 += float(active.sum())
        s_cos += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=-1, eps=1e-12).sum())
        s_xh2 += float(xh64.pow(2).sum())
        s_dot += float((x64 * xh64).sum())
        fires += active.sum(0).double()
    mean = s_x / n
    total_var = s_x2 - n * float(mean.pow(2).sum())
    rate = fires / n
    return {
        "tokens": n,
        "l0": s_l0 / n,
        "mse": s_err / n,
        "fvu": s_err / total_var if total_var > 0 else float("nan"),
        "cosine": s_cos / n,
        "shrinkage": s_xh2 / s_dot if s_dot != 0 else float("nan"),
        "dead_frac": float((fires == 0).double().mean()),
        "dense_frac": float((rate > dense_threshold).double().mean()),
        "mean_activation": mean.float(),
    }


def _lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real tokens, and how many tokens were scored."""
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].to(logits.device)
    scored = (attention[:, 1:] * attention[:, :-1]).bool().to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum")
    return float(ce), int(scored.sum())


@torch.no_grad()
def spliced_loss_metrics(
    sae: SAE, source: ActivationSource, n_docs: int, mean_activation: torch.Tensor, first_doc: int = 0
) -> dict[str, float]:
    """LM loss clean / SAE-spliced / zero-ablated / mean-ablated, and the CE-recovered scores."""
    from ..core.hooks import site_hooks

    sae.eval()
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    count = 0
    step = source.cfg.model_batch_size
    for start in range(first_doc, first_doc + n_docs, step):
        docs = [source.order[i] for i in range(start, min(start + step, first_doc + n_docs))]
        input_ids, attention, keep = tokenize_docs(source.tokenizer, docs, source.cfg)
        for mode in totals:

            def replace(x: torch.Tensor, mode: str = mode, keep: torch.Tensor = keep) -> torch.Tensor | None:
                if mode == "clean":
                    return None
                mask = keep.to(x.device).clone()
                rows = x[mask].float()
                ok = drop_outliers(rows.cpu(), source.cfg.outlier_factor).to(x.device)
                mask[mask.clone()] = ok  # outliers keep their activation, as in training
                rows = x[mask].float()
                if mode == "sae":
                    new = sae.decode(sae.encode(rows.to(sae.W_enc.device))).to(x.device)
                elif mode == "zero":
                    new = torch.zeros_like(rows)
                else:
                    new = mean_activation.to(x.device).expand_as(rows)
                out = x.clone()
                out[mask] = new.to(x.dtype)
                return out

            with site_hooks(source.model, {(source.layer, source.site): replace}, adapter=source.adapter):
                loss, n = _lm_loss(source.model, input_ids, attention)
            totals[mode] += loss
            if mode == "clean":
                count += n
    losses = {k: v / max(1, count) for k, v in totals.items()}

    def recovered(ablated: float) -> float:
        gap = ablated - losses["clean"]
        return (ablated - losses["sae"]) / gap if abs(gap) > 1e-12 else float("nan")

    return {
        "ce_clean": losses["clean"],
        "ce_sae": losses["sae"],
        "ce_zero_ablation": losses["zero"],
        "ce_mean_ablation": losses["mean"],
        "delta_loss": losses["sae"] - losses["clean"],
        "ce_recovered_zero": recovered(losses["zero"]),
        "ce_recovered_mean": recovered(losses["mean"]),
        "ce_tokens": count,
    }


def metric_warnings(metrics: dict[str, Any]) -> list[str]:
    """Plain-language warnings for metrics outside their usual range, with what they mean.

    A CE-recovered score above 1 is not a bug by itself: it means the loss with the SAE spliced in is *lower* than
    the clean loss. That happens when the model fits the evaluation text poorly (the organism, a chat model trained
    on its own corpus, has a plain-text CE of about 6.3 nats, and a chat-data SAE spliced in lowered it by 0.11 in
    our check), so any perturbation can help. Shrinkage above 1 means reconstructions are longer than the inputs'
    component along them.
    """
    out = []
    for key in ("ce_recovered_zero", "ce_recovered_mean"):
        value = metrics.get(key)
        if isinstance(value, float) and math.isfinite(value) and not -0.05 <= value <= 1.05:
            out.append(
                f"{key} = {value:.2f} is outside [0, 1]: the SAE-spliced loss ({metrics['ce_sae']:.3f}) is "
                f"{'below' if value > 1 else 'above the ablated loss, not between it and'} the clean loss "
                f"({metrics['ce_clean']:.3f}). The model fits this data poorly (clean CE {metrics['ce_clean']:.2f} "
                "nats) or the SAE is worse than ablation; evaluate on data the model was trained on, and read "
                "delta_loss."
            )
    shrink = metrics.get("shrinkage")
    if isinstance(shrink, float) and math.isfinite(shrink) and not 0.5 <= shrink <= 1.2:
        out.append(
            f"shrinkage = {shrink:.2f} (E|x_hat|^2 / E[x.x_hat]) is far from 1: reconstructions are "
            f"{'longer' if shrink > 1 else 'shorter'} than the inputs' component along them; with FVU "
            f"{metrics.get('fvu', float('nan')):.2f} the SAE is probably under-trained (more --tokens)."
        )
    return out


def evaluate_sae(sae: SAE, source: ActivationSource | Stream, cfg: EvalConfig) -> dict[str, Any]:
    """All metrics; LM-loss metrics only when ``source`` is a model-backed :class:`ActivationSource`."""
    metrics = reconstruction_metrics(sae, source, cfg.tokens, cfg.dense_threshold)
    mean = metrics.pop("mean_activation")
    if isinstance(source, ActivationSource) and cfg.ce_docs > 0:
        # Score LM loss on documents after those the reconstruction metrics used, so the two are separate.
        metrics.update(spliced_loss_metrics(sae, source, cfg.ce_docs, mean, first_doc=source.state_dict()["next_doc"]))
    metrics["warnings"] = metric_warnings(metrics)
    return metrics
