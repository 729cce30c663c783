"""Reading and writing SAEs in the formats other tools use.

Written: SAELens v6 (``cfg.json`` + ``sae_weights.safetensors``; our primary format) and, for TopK SAEs,
sparsify (``cfg.json`` + ``sae.safetensors``). Read: SAELens v6 and pre-6, sparsify, dictionary_learning
(``ae.pt`` + ``config.json``, loaded with ``weights_only=True`` so a file cannot run code), Gemma Scope
``params.npz``. :func:`load_sae` detects the format. Every reader checks shapes against each other and,
when given, against the model's ``d_model``, and turns missing/corrupted files into :class:`UserError`.

Conventions of the foreign formats (what each tensor means):

* sparsify: ``encoder.weight [m, d]`` (= W_encᵀ), ``encoder.bias`` (= b_enc), ``W_dec [m, d]``, ``b_dec``;
  f = TopK(ReLU(encoder(x - b_dec))). A hookpoint ``layers.N`` is the output of decoder layer N.
* dictionary_learning: torch ``nn.Linear`` layouts, ``encoder.weight [m, d]``, ``decoder.weight [d, m]``;
  the decoder bias is ``bias`` (AutoEncoder), ``b_dec`` (TopK/BatchTopK), ``decoder_bias`` (Gated),
  ``decoder.bias`` (the April-style AutoEncoderNew, which subtracts nothing from the input).
* Gemma Scope: ``W_enc [d, m]``, ``W_dec [m, d]``, ``b_enc``, ``b_dec``, ``threshold``; JumpReLU without
  subtracting ``b_dec`` from the input.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .base import SAE, SAEConfig
from .registry import REGISTRY

SAELENS_WEIGHTS = "sae_weights.safetensors"
_SITE_OF_HOOK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
}


# ---------------------------------------------------------------------------------------------- writing
def saelens_cfg(sae: SAE, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens v6 ``cfg.json`` of ``sae``; ``metadata`` goes under the ``metadata`` key."""
    cfg: dict[str, Any] = {
        "architecture": sae.saelens_arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.saelens_arch == "topk":
        cfg["k"] = int(sae.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    # SAELens treats a cfg.json as v6 only when metadata.sae_lens_version >= 6; without it the metadata
    # (hook_name...) is silently dropped on load. "6.0.0" names the format version we write.
    meta = {
        "sae_lens_version": "6.0.0",
        "sae_lens_training_version": None,
        "model_name": None,
        "hook_name": None,
        "context_size": None,
        "prepend_bos": True,
        "dataset_path": None,
    }
    meta.update(metadata or {})
    meta["refusal_lens_arch"] = sae.arch
    if sae.arch == "batchtopk":
        meta["k"] = int(sae.k)  # the training-time k, so the SAE can be trained further
    cfg["metadata"] = meta
    return cfg


def save_saelens(sae: SAE, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as a SAELens v6 folder (files written atomically; ``cfg.json`` last)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(sae.export_tensors(), out / SAELENS_WEIGHTS)
    atomic_write_json(out / "cfg.json", saelens_cfg(sae, metadata))
    return out


def save_sparsify(sae: SAE, folder: str | Path) -> Path:
    """Write a TopK SAE in sparsify's layout (``folder`` should be named after the hookpoint)."""
    if sae.saelens_arch != "topk" or not sae.apply_b_dec_to_input:
        raise UserError(f"sparsify stores TopK SAEs only; this SAE is {sae.arch!r}. Save it as SAELens instead.")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": sae.W_enc.detach().T,
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    atomic_save_safetensors(tensors, out / "sae.safetensors")
    atomic_write_json(
        out / "cfg.json",
        {
            "activation": "topk",
            "expansion_factor": max(1, sae.d_sae // sae.d_in),
            "normalize_decoder": True,
            "num_latents": sae.d_sae,
            "k": int(sae.k),
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": sae.d_in,
        },
    )
    return out


# ---------------------------------------------------------------------------------------------- building
def _build(
    arch: str,
    tensors: dict[str, torch.Tensor],
    where: str,
    *,
    k: int | None = None,
    apply_b_dec: bool = True,
    metadata: dict[str, Any] | None = None,
    d_model: int | None = None,
) -> SAE:
    """Validate SAELens-named ``tensors`` and load them into our class for ``arch``."""
    for name in ("W_enc", "W_dec", "b_dec"):
        if name not in tensors:
            raise UserError(f"{where} has no tensor {name!r}; it is not a complete {arch} SAE.")
    d_in, d_sae = tensors["W_enc"].shape if tensors["W_enc"].ndim == 2 else (0, 0)
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    needs = {
        "standard": ["b_enc"],
        "april": ["b_enc"],
        "topk": ["b_enc"],
        "jumprelu": ["b_enc", "threshold"],
        "batchtopk": ["b_enc", "threshold"],
        "gated": ["b_gate", "r_mag", "b_mag"],
    }[arch]
    for name in needs:
        if name not in tensors:
            raise UserError(f"{where} has no tensor {name!r}, which a {arch} SAE needs; the file is incomplete.")
        expected[name] = (d_sae,)
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if arch == "batchtopk" and name == "threshold" and tensors[name].numel() in (1, d_sae):
            got = shape  # one global threshold, stored as a scalar or repeated per latent
        if got != shape:
            raise UserError(
                f"{where}: tensor {name} has shape {got}, expected {shape} from W_enc {d_in}x{d_sae}; "
                "the file is inconsistent."
            )
        if not torch.isfinite(tensors[name]).all():
            raise UserError(f"{where}: tensor {name} contains NaN/inf; the SAE is corrupted.")
    if d_model is not None and d_in != d_model:
        raise UserError(
            f"{where} reads activations of width {d_in} but the model's d_model is {d_model}; "
            "use an SAE trained on this model (or the right site)."
        )
    dtype = str(tensors["W_enc"].dtype).removeprefix("torch.")
    cfg = SAEConfig(arch=arch, d_in=d_in, width=d_sae, k=k or 1, apply_b_dec_to_input=apply_b_dec, dtype=dtype)
    sae = REGISTRY[arch](cfg)  # every parameter is overwritten below, so no initialisation
    sae.load_exported(tensors)
    sae.metadata = dict(metadata or {})
    sae.eval()
    return sae


def _arch_from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    ours = meta.get("refusal_lens_arch")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or meta.get("k")
    if cfg.get("activation_fn_str") == "topk" or cfg.get("activation_fn") == "topk":
        arch = "topk"
    if ours == "april" and arch == "standard":
        return "april", None
    if ours == "batchtopk" and arch == "jumprelu":
        t = tensors.get("threshold")
        if t is not None and bool((t == t.reshape(-1)[0]).all()):
            return "batchtopk", k
    if arch in ("standard", "gated", "jumprelu"):
        return arch, None
    if arch == "topk":
        if not k:
            raise UserError(f"{where} is a TopK SAE without 'k' in its cfg.json; add \"k\": <int>.")
        return "topk", int(k)
    raise UserError(
        f"{where} has SAELens architecture {arch!r}, which refusal-lens cannot run; "
        "supported: standard, gated, topk, jumprelu."
    )


def load_saelens(folder: str | Path, d_model: int | None = None) -> SAE:
    """Load a SAELens v6 or pre-6 folder."""
    folder = Path(folder)
    cfg = read_json(folder / "cfg.json", what="SAE config")
    where = f"SAE {folder}"
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise UserError(f"{folder / 'cfg.json'} is not a SAELens config (no 'd_in'); point --sae at an SAE folder.")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(
            f"{where} expects inputs normalised with {cfg['normalize_activations']!r}; fold the "
            "normalisation into the weights with SAELens first, then save it again."
        )
    tensors = load_safetensors(folder / SAELENS_WEIGHTS, what="SAE weights")
    arch, k = _arch_from_saelens(cfg, tensors, where)
    if "metadata" in cfg:  # v6: usage facts live under metadata
        meta = dict(cfg["metadata"] or {})
        meta["format"] = "saelens-v6"
    else:  # pre-6: flat
        meta = {
            key: cfg.get(key)
            for key in (
                "model_name",
                "hook_name",
                "hook_layer",
                "context_size",
                "prepend_bos",
                "dataset_path",
            )
        }
        meta["format"] = "saelens-pre6"
    w_enc = tensors.get("W_enc")
    if w_enc is not None and (int(cfg["d_in"]), int(cfg.get("d_sae", w_enc.shape[-1]))) != tuple(w_enc.shape):
        raise UserError(
            f"{where}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg.get('d_sae')} but W_enc is "
            f"{tuple(tensors['W_enc'].shape)}; the folder mixes two SAEs."
        )
    return _build(
        arch,
        tensors,
        where,
        k=k,
        apply_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        metadata=meta,
        d_model=d_model,
    )


def _hookpoint_meta(hookpoint: str) -> dict[str, Any]:
    m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)(?:\.(mlp|self_attn|attn))?", hookpoint)
    if not m:
        return {"hookpoint": hookpoint}
    site = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out"}[m.group(2)]
    layer = int(m.group(1))
    return {"hookpoint": hookpoint, "layer": layer, "site": site, "hook_name": f"blocks.{layer}.hook_{site}"}


def load_sparsify(folder: str | Path, d_model: int | None = None) -> SAE:
    """Load a sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``)."""
    folder = Path(folder)
    cfg = read_json(folder / "cfg.json", what="sparsify config")
    where = f"sparsify SAE {folder}"
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise UserError(
            f"{where} is a {cfg.get('activation')} / transcoder / skip-connection coder; only plain "
            "TopK SAEs can be loaded."
        )
    raw = load_safetensors(folder / "sae.safetensors", what="sparsify weights")
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in raw:
            raise UserError(f"{where} has no tensor {name!r}; the file is incomplete.")
    tensors = {
        "W_enc": raw["encoder.weight"].T.contiguous(),
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    meta = _hookpoint_meta(folder.name) | {"format": "sparsify"}
    return _build("topk", tensors, where, k=int(cfg.get("k", 32)), metadata=meta, d_model=d_model)


def load_dictionary_learning(path: str | Path, d_model: int | None = None) -> SAE:
    """Load a dictionary_learning ``ae.pt`` (a state dict; never unpickles code)."""
    path = Path(path)
    file = path / "ae.pt" if path.is_dir() else path
    where = f"dictionary_learning SAE {file}"
    if not file.is_file():
        raise UserError(f"{where} does not exist; check the path.")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{where} is not a readable weights-only torch file ({type(exc).__name__}); re-download "
            "it (files that need unpickling code are refused on purpose)."
        ) from None
    if not isinstance(sd, dict):
        raise UserError(f"{where} does not hold a state dict.")
    cfg_file = file.parent / "config.json"
    trainer = read_json(cfg_file, what="dictionary_learning config").get("trainer", {}) if cfg_file.is_file() else {}
    meta = {
        "format": "dictionary_learning",
        "dict_class": trainer.get("dict_class"),
        "model_name": trainer.get("lm_name"),
        "layer": trainer.get("layer"),
        "hf_module_path": trainer.get("submodule_name"),
    }
    t = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if "W_enc" in t and "threshold" in t:  # JumpReluAutoEncoder: already SAELens-shaped
        tensors = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if k in t}
        return _build(
            "jumprelu",
            tensors,
            where,
            apply_b_dec=bool(trainer.get("apply_b_dec_to_input", False)),
            metadata=meta,
            d_model=d_model,
        )
    if "encoder.weight" not in t or "decoder.weight" not in t:
        raise UserError(f"{where} has neither encoder.weight/decoder.weight nor W_enc; unknown dictionary class.")
    W_enc, W_dec = t["encoder.weight"].T.contiguous(), t["decoder.weight"].T.contiguous()
    if "decoder_bias" in t:  # GatedAutoEncoder
        tensors = {
            "W_enc": W_enc,
            "W_dec": W_dec,
            "b_dec": t["decoder_bias"],
            "b_gate": t.get("gate_bias"),
            "r_mag": t.get("r_mag"),
            "b_mag": t.get("mag_bias"),
        }
        return _build(
            "gated",
            {k: v for k, v in tensors.items() if v is not None},
            where,
            metadata=meta,
            d_model=d_model,
        )
    if "b_dec" in t:  # AutoEncoderTopK / BatchTopKSAE
        k = int(t["k"]) if "k" in t else int(trainer.get("k", 0) or 0)
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": t["b_dec"], "b_enc": t["encoder.bias"]}
        batch_thr = "threshold" in t and t["threshold"].numel() == 1 and float(t["threshold"]) >= 0
        if batch_thr and trainer.get("dict_class") != "AutoEncoderTopK":
            tensors["threshold"] = t["threshold"].reshape(1)
            return _build("batchtopk", tensors, where, k=k or 1, metadata=meta, d_model=d_model)
        if not k:
            raise UserError(f"{where} is a TopK SAE without 'k' in ae.pt or config.json; the file is incomplete.")
        return _build("topk", tensors, where, k=k, metadata=meta, d_model=d_model)
    if "decoder.bias" in t:  # AutoEncoderNew (April-2024 style): no input centring
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": t["decoder.bias"], "b_enc": t["encoder.bias"]}
        return _build("standard", tensors, where, apply_b_dec=False, metadata=meta, d_model=d_model)
    if "bias" in t:  # AutoEncoder
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": t["bias"], "b_enc": t["encoder.bias"]}
        return _build("standard", tensors, where, metadata=meta, d_model=d_model)
    raise UserError(f"{where}: tensors {sorted(t)} match no known dictionary_learning class.")


def load_gemma_scope(path: str | Path, d_model: int | None = None) -> SAE:
    """Load a Gemma Scope ``params.npz`` (JumpReLU, input not centred)."""
    import numpy as np

    path = Path(path)
    file = path / "params.npz" if path.is_dir() else path
    where = f"Gemma Scope SAE {file}"
    if not file.is_file():
        raise UserError(f"{where} does not exist; check the path.")
    try:
        with np.load(file, allow_pickle=False) as npz:
            tensors = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except Exception as exc:
        raise UserError(f"{where} is not a readable .npz file ({type(exc).__name__}); re-download it.") from None
    return _build("jumprelu", tensors, where, apply_b_dec=False, metadata={"format": "gemma-scope"}, d_model=d_model)


def detect_format(path: str | Path) -> str:
    """Name the format of an SAE path: saelens, sparsify, dictionary_learning or gemma_scope."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"SAE path {p} does not exist; check --sae.")
    if p.is_file():
        if p.suffix == ".npz":
            return "gemma_scope"
        if p.suffix in (".pt", ".pth"):
            return "dictionary_learning"
        p = p.parent
    if (p / SAELENS_WEIGHTS).exists():
        return "saelens"
    if (p / "sae.safetensors").exists():
        return "sparsify"
    if (p / "ae.pt").exists():
        return "dictionary_learning"
    if (p / "params.npz").exists():
        return "gemma_scope"
    subs = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "sae.safetensors").exists())
    if subs:
        raise UserError(
            f"{p} holds sparsify SAEs for several hookpoints ({', '.join(subs[:6])}); "
            "point --sae at one of those folders."
        )
    raise UserError(
        f"{p} holds no SAE files (sae_weights.safetensors, sae.safetensors, ae.pt or params.npz); check --sae."
    )


def load_sae(path: str | Path, d_model: int | None = None) -> SAE:
    """Load an SAE in any supported format, checking its width against ``d_model`` when given."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "saelens":
        return load_saelens(p if p.is_dir() else p.parent, d_model)
    if fmt == "sparsify":
        return load_sparsify(p if p.is_dir() else p.parent, d_model)
    if fmt == "dictionary_learning":
        return load_dictionary_learning(p, d_model)
    return load_gemma_scope(p, d_model)
