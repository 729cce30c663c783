"""PyTorch hooks on residual-stream sites, always inside a context manager and always removed.

:func:`site_hooks` attaches one function per site; the function receives the site's activation
``[batch, seq, d_model]`` and returns a replacement (or ``None`` to only read it). Whether a site is read
from a module's input (``resid_pre``) or output, and whether that output is a tuple, is handled here, so
interventions and captures are written once for every family.

Example:
    >>> seen = {}
    >>> with site_hooks(model, {(3, "resid_pre"): lambda x: seen.setdefault("x", x)}):  # doctest: +SKIP
    ...     model(**batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import ArchitectureAdapter, get_adapter

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]
Site = tuple[int, str]


def _input_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = fn(args[0])
            if new is not None:
                return (new, *args[1:]), kwargs
        elif "hidden_states" in kwargs:
            new = fn(kwargs["hidden_states"])
            if new is not None:
                return args, {**kwargs, "hidden_states": new}
        return None

    return hook


def _output_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return hook


@contextmanager
def site_hooks(
    model: nn.Module,
    fns: Mapping[Site, SiteFn | list[SiteFn]],
    adapter: ArchitectureAdapter | None = None,
) -> Iterator[ArchitectureAdapter]:
    """Attach ``fns[(layer, site)]`` to each site for the duration of the block; yields the adapter."""
    adapter = adapter or get_adapter(model)
    handles = []
    try:
        for (layer, site), f in fns.items():
            for fn in f if isinstance(f, list) else [f]:
                module, mode = adapter.site_module(layer, site)
                if mode == "input":
                    handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_output_hook(fn)))
        yield adapter
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def module_output_hooks(modules: list[nn.Module], fn: SiteFn) -> Iterator[None]:
    """Apply ``fn`` to the output of each module (tuple outputs: to element 0) inside the block."""
    handles = [m.register_forward_hook(_output_hook(fn)) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
