"""Atomic artifact writing and provenance.

A crash never leaves a half-written file: every artifact is written to a temporary file in the same
folder and renamed into place. Commands that write a whole output folder build it in a staging folder
beside the target and rename it at the end, so a failed run leaves no partial output directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

PathLike = str | os.PathLike
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    For writers that need a file name (``save_file``, matplotlib): write to the yielded path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically. Non-finite floats are written as null."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n")


def _finite(obj: Any) -> Any:
    # JSON has no NaN/Infinity; strict parsers (browsers) reject them, so store null instead.
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save ``tensors`` as safetensors atomically (tensors are made contiguous and moved to CPU)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: PathLike, what: str = "file") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupted file into a :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; check the path.")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for truncated/corrupted headers
        raise UserError(f"{what} {p} is not a readable safetensors file ({exc}); re-create it.") from None


def read_json(path: PathLike, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; check the path.")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {p} is not valid JSON ({exc}); fix or re-create it.") from None


@contextmanager
def staging_dir(out_dir: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build an output folder atomically.

    Yields an empty staging folder beside ``out_dir``. If the block succeeds the staging folder replaces
    ``out_dir``; if it raises, the staging folder is deleted and ``out_dir`` is left as it was.
    """
    target = Path(out_dir).resolve()
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} already exists; choose another --out or remove it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions, time and host facts to store beside every artifact, plus ``extra``."""
    import transformers

    from .. import __version__

    info: dict[str, Any] = {
        "refusal_lens_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra)
    return info
