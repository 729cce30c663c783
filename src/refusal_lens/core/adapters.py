"""Architecture adapters: the one place that knows where each model family keeps its parts.

Every other module asks an :class:`ArchitectureAdapter` for decoder layers, the modules whose outputs are
written into the residual stream, embeddings, norms and the weight matrices to orthogonalize. Nothing else
in the package hard-codes a module path.

A *residual write* is the module whose output is added to the residual stream unchanged: the attention
out-projection and the MLP down-projection in pre-norm families, the post-sublayer norm in families that
normalise a sublayer's output before adding it (Gemma-2, OLMo-2), the whole sparse block in MoE families.

Example:
    >>> from refusal_lens.core.adapters import get_adapter
    >>> adapter = get_adapter(model)                     # doctest: +SKIP
    >>> module, mode = adapter.site_module(3, "resid_pre")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import UserError

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class FamilySpec:
    """Where one family keeps its parts. Paths are relative to the CausalLM (or to a decoder layer)."""

    layers: str
    embed: str
    final_norm: str
    attn_write: str  # relative to a decoder layer
    mlp_write: str  # relative to a decoder layer
    attn_out_proj: str  # matrix that writes the attention output (relative to a layer)
    mlp_out_proj: str  # dense MLP's down-projection (relative to a layer)
    pos_embed: str | None = None
    post_norms: bool = False  # a norm sits between the sublayer and the residual add
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    moe: bool = False
    extra_out_projs: tuple[str, ...] = field(default=())  # e.g. a MoE shared expert's down-projection
    exact_tail: bool = False
    """The decoder feeds ``inputs_embeds`` to layer 0 unchanged (no embedding scale or multiplier, no
    absolute position embeddings, in every supported transformers version), so a forward from
    ``inputs_embeds = resid_pre[l]`` with only layers ``l..L-1`` equals the full forward from layer l on."""


_LLAMA_LIKE = FamilySpec(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn_write="self_attn.o_proj",
    mlp_write="mlp.down_proj",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
    exact_tail=True,
)
_POST_NORM = FamilySpec(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn_write="post_attention_layernorm",
    mlp_write="post_feedforward_layernorm",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
    post_norms=True,
    exact_tail=True,
)
_MOE = FamilySpec(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn_write="self_attn.o_proj",
    mlp_write="mlp",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",  # used by dense (non-MoE) layers of a MoE model
    moe=True,
    extra_out_projs=("mlp.shared_expert.down_proj",),
    exact_tail=True,
)
# Gemma (×√d) and Granite (embedding_multiplier) scale the embeddings inside the decoder's forward (Gemma
# moved the scale into the embedding module in transformers 5, but 4.x still scales inputs_embeds).
_SCALED_EMBED = replace(_LLAMA_LIKE, exact_tail=False)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _SCALED_EMBED,
    "phi3": _LLAMA_LIKE,
    "granite": _SCALED_EMBED,
    "gemma2": replace(_POST_NORM, exact_tail=False),
    "gemma3_text": replace(_POST_NORM, exact_tail=False),
    "olmo2": _POST_NORM,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "mixtral": _MOE,
    "gpt2": FamilySpec(
        layers="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        attn_write="attn.c_proj",
        mlp_write="mlp.c_proj",
        attn_out_proj="attn.c_proj",
        mlp_out_proj="mlp.c_proj",
        conv1d=True,
    ),
    "gpt_neox": FamilySpec(
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn_write="attention.dense",
        mlp_write="mlp.dense_4h_to_h",
        attn_out_proj="attention.dense",
        mlp_out_proj="mlp.dense_4h_to_h",
        exact_tail=True,  # its embedding dropout is the identity in eval mode
    ),
}


@dataclass(frozen=True)
class ResidualWriter:
    """A parameter that writes into the residual stream, and which of its axes is the model dimension."""

    name: str  # parameter name in model.named_parameters() / the checkpoint
    param: nn.Parameter
    axis: int  # the axis of size d_model that is projected


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class ArchitectureAdapter:
    """Gives family-independent access to a loaded causal LM's parts."""

    def __init__(self, model: nn.Module, spec: FamilySpec, family: str):
        self.model = model
        self.spec = spec
        self.family = family
        layers = _get(model, spec.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UserError(
                f"model of type {family!r} has no decoder layers at {spec.layers!r}; "
                "it may be a base model without an LM head: load it with AutoModelForCausalLM."
            )
        self.layers: list[nn.Module] = list(layers)
        self.n_layers = len(self.layers)
        self.embed: nn.Embedding = model.get_submodule(spec.embed)
        self.d_model = int(self.embed.weight.shape[1])
        self.pos_embed = _get(model, spec.pos_embed) if spec.pos_embed else None
        self.final_norm = model.get_submodule(spec.final_norm)
        self.lm_head = model.get_output_embeddings()
        self.post_norms = spec.post_norms
        self.is_moe = spec.moe
        self.path_of = {id(m): n for n, m in model.named_modules()}

    # ----------------------------------------------------------------- modules
    def attn_write(self, layer: int) -> nn.Module:
        """The module whose output is the attention block's write into the residual stream."""
        return self.layers[self.check_layer(layer)].get_submodule(self.spec.attn_write)

    def mlp_write(self, layer: int) -> nn.Module:
        """The module whose output is the MLP (or MoE block's) write into the residual stream."""
        return self.layers[self.check_layer(layer)].get_submodule(self.spec.mlp_write)

    def residual_writes(self) -> list[nn.Module]:
        """Every module whose output is added to the residual stream, in order (embeddings excluded)."""
        return [m for layer in range(self.n_layers) for m in (self.attn_write(layer), self.mlp_write(layer))]

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is out of range; this model has layers 0..{self.n_layers - 1}.")
        return layer

    def site_module(self, layer: int, site: str) -> tuple[nn.Module, str]:
        """Where to read a site: ``(module, "input")`` for a forward pre-hook, ``(module, "output")``.

        ``resid_pre`` of layer l is the input of decoder block l; ``resid_post`` its output.
        """
        self.check_layer(layer)
        if site == "resid_pre":
            return self.layers[layer], "input"
        if site == "resid_post":
            return self.layers[layer], "output"
        if site == "attn_out":
            return self.attn_write(layer), "output"
        if site == "mlp_out":
            return self.mlp_write(layer), "output"
        raise UserError(f"site {site!r} does not exist; choose one of {', '.join(SITES)}.")

    def module_path(self, layer: int, site: str) -> str:
        """The HF module path of a site, e.g. ``model.layers.13`` (resid_pre reads its input)."""
        module, _ = self.site_module(layer, site)
        return self.path_of[id(module)]

    @staticmethod
    def hook_name(layer: int, site: str) -> str:
        """The TransformerLens-style hook name of a site (SAELens uses these)."""
        return {
            "resid_pre": f"blocks.{layer}.hook_resid_pre",
            "resid_post": f"blocks.{layer}.hook_resid_post",
            "attn_out": f"blocks.{layer}.hook_attn_out",
            "mlp_out": f"blocks.{layer}.hook_mlp_out",
        }[site]

    @contextmanager
    def tail_layers(self, start: int) -> Iterator[None]:
        """Inside the block the decoder runs only layers ``start..L-1``: call the model with
        ``inputs_embeds`` = the residual stream entering layer ``start`` to get the full model's output.

        Only exact where ``spec.exact_tail`` (see :class:`FamilySpec`); callers fall back to full forwards
        elsewhere. A per-layer ``config.layer_types`` list (sliding/full attention) is sliced alongside, as
        decoders index it by the position in the layer list. The layer list is always restored.
        """
        self.check_layer(start)
        parent_path, _, name = self.spec.layers.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        config = getattr(parent, "config", None)
        types = getattr(config, "layer_types", None)
        full = getattr(parent, name)
        try:
            setattr(parent, name, nn.ModuleList(self.layers[start:]))
            if isinstance(types, list) and len(types) == self.n_layers:
                config.layer_types = types[start:]
            yield
        finally:
            setattr(parent, name, full)
            if isinstance(types, list) and len(types) == self.n_layers:
                config.layer_types = types

    # ----------------------------------------------------------------- weights
    def tied_embeddings(self) -> bool:
        """True when the unembedding shares its weight with the token embedding."""
        return self.lm_head is not None and self.lm_head.weight is self.embed.weight

    def residual_writers(self) -> list[ResidualWriter]:
        """Every parameter that writes into the residual stream, for weight orthogonalization.

        Token (and positional) embeddings, attention out-projections, MLP down-projections (every expert's
        and the shared expert's in MoE layers) and their biases.
        """
        return [w for _, _, group in self.writer_groups() for w in group]

    def writer_groups(self) -> list[tuple[str, int | None, list[ResidualWriter]]]:
        """The residual writers grouped by what writes: ``("embed", None, [...])``, then ``("attn", l, [...])``
        and ``("mlp", l, [...])`` for each layer, for edits with a strength per layer and per write."""
        names: dict[int, str] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # a tied weight keeps its first name (the input embedding's)

        def add(out: list[ResidualWriter], module: nn.Module | None, conv1d: bool = False) -> None:
            if module is None:
                return
            weight = module.weight
            axis = 1 if conv1d or isinstance(module, nn.Embedding) else 0
            out.append(ResidualWriter(names[id(weight)], weight, axis))
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                out.append(ResidualWriter(names[id(bias)], bias, 0))

        embed: list[ResidualWriter] = []
        add(embed, self.embed)
        add(embed, self.pos_embed)
        groups: list[tuple[str, int | None, list[ResidualWriter]]] = [("embed", None, embed)]
        for index, layer in enumerate(self.layers):
            attn: list[ResidualWriter] = []
            add(attn, layer.get_submodule(self.spec.attn_out_proj), self.spec.conv1d)
            mlp: list[ResidualWriter] = []
            dense = _get(layer, self.spec.mlp_out_proj)
            if dense is not None:
                add(mlp, dense, self.spec.conv1d)
            if self.spec.moe:
                experts = _get(layer, "mlp.experts")
                if experts is not None:
                    mlp.extend(self._expert_writers(experts, names))
                for extra in self.spec.extra_out_projs:
                    add(mlp, _get(layer, extra))
            groups += [("attn", index, attn), ("mlp", index, mlp)]
        return groups

    def _expert_writers(self, experts: nn.Module, names: dict[int, str]) -> list[ResidualWriter]:
        fused = getattr(experts, "down_proj", None)
        if isinstance(fused, nn.Parameter):
            # transformers v5 stores experts fused: down_proj [n_experts, d_model, d_expert]
            return [ResidualWriter(names[id(fused)], fused, 1)]
        found = []
        for expert in experts:  # older layout: a ModuleList of MLPs
            proj = getattr(expert, "down_proj", None) or getattr(expert, "w2", None)
            if proj is None:
                raise UserError(f"cannot find the down-projection of MoE experts in {self.family!r}.")
            found.append(ResidualWriter(names[id(proj.weight)], proj.weight, 0))
        return found


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """Return the adapter for a loaded HF causal LM, or a clear error for an unsupported family."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    spec = FAMILIES.get(family)
    if spec is None:
        raise UserError(
            f"unsupported architecture {family!r}; supported: {', '.join(sorted(FAMILIES))}. "
            "Add a FamilySpec for it in refusal_lens/adapters.py."
        )
    adapter = ArchitectureAdapter(model, spec, family)
    _verify(adapter)
    return adapter


def _verify(adapter: ArchitectureAdapter) -> None:
    """Check at load time that every module the adapter names exists and has the model width."""
    for layer in range(adapter.n_layers):
        for module in (adapter.attn_write(layer), adapter.mlp_write(layer)):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2:
                out_dim = weight.shape[1] if adapter.spec.conv1d else weight.shape[0]
                if out_dim != adapter.d_model:
                    raise UserError(
                        f"{adapter.family!r}: residual write {adapter.path_of[id(module)]} has width "
                        f"{out_dim}, expected {adapter.d_model}; this variant is not supported."
                    )
