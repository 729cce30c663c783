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
from collections.abc import Iterator, Mapping, Sequence
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
        sort_safetensors_header(tmp)


def sort_safetensors_header(path: PathLike) -> None:
    """Rewrite a safetensors header with sorted keys, in place, so equal tensors give equal bytes.

    safetensors keeps ``__metadata__`` in a hash map whose order changes from process to process. Sorting
    only reorders the JSON object, so the header keeps its length and the data offsets stay valid.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # a different escaping than the writer's: leave the valid file as it is
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))  # the format pads headers with spaces


def load_safetensors(path: PathLike, what: str = "file") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupted file into a :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; check the path.")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for truncated/corrupted headers
        raise UserError(f"{what} {p} is not a readable safetensors file ({exc}); re-create it.") from None


def read_text_file(path: PathLike, what: str = "file") -> str:
    """Read a user's UTF-8 text file; a missing, unreadable or non-UTF-8 file is a :class:`UserError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; check the path.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8.") from None
    except OSError as exc:
        raise UserError(f"{what} {p} cannot be read ({exc.strerror}); check its permissions.") from None


def read_json(path: PathLike, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a :class:`UserError`."""
    p = Path(path)
    try:
        return json.loads(read_text_file(p, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {p} is not valid JSON ({exc}); fix or re-create it.") from None


STAGE_TAG = ".partial-"
OLD_TAG = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _leftovers(target: Path, tag: str) -> list[tuple[Path, int]]:
    """Hidden ``.<name><tag><pid>`` folders beside ``target``, with their pids."""
    out = []
    prefix = f".{target.name}{tag}"
    try:
        entries = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit():
            out.append((entry, int(entry.name[len(prefix) :])))
    return out


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _restore_stranded(target: Path) -> None:
    """Put back a user's folder that a killed run had moved aside (``.old-<pid>``) but not yet replaced."""
    for old, pid in _leftovers(target, OLD_TAG):
        if pid != os.getpid() and not _pid_alive(pid):
            if not target.exists():
                os.replace(old, target)
            else:
                _rmtree(old)


def clean_stale(target: PathLike, keep_newest_stage: bool = False) -> Path | None:
    """Remove what a killed run left beside ``target``; returns a stale staging folder kept for resuming.

    Staging folders are named ``.<name>.partial-<pid>`` and replaced folders ``.<name>.old-<pid>``; only those
    whose process is dead are touched. A ``.old-`` folder whose run died before the new folder took its place is
    renamed back to ``target`` (it is the user's previous output). With ``keep_newest_stage`` the newest dead
    staging folder is kept (and returned) so the caller can adopt it.
    """
    target = Path(target).absolute()
    _restore_stranded(target)
    stale = sorted(
        ((p, pid) for p, pid in _leftovers(target, STAGE_TAG) if pid != os.getpid() and not _pid_alive(pid)),
        key=lambda item: item[0].stat().st_mtime,
    )
    kept = stale.pop()[0] if keep_newest_stage and stale else None
    for path, _ in stale:
        _rmtree(path)
    return kept


def stale_stage(target: PathLike) -> Path | None:
    """The newest staging folder a killed run left for ``target`` (what ``staging_dir(resume=True)`` adopts)."""
    target = Path(target).expanduser().absolute()
    dead = [p for p, pid in _leftovers(target, STAGE_TAG) if pid != os.getpid() and not _pid_alive(pid)]
    return max(dead, key=lambda p: p.stat().st_mtime) if dead else None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(
    out_dir: PathLike, overwrite: bool = False, inputs: Sequence[PathLike | None] = (), flag: str = "--out"
) -> Path:
    """Refuse an output folder that would lose the user's data; returns its absolute path.

    Refused: an existing file; a non-empty folder unless ``overwrite``; the current folder or one containing it;
    a folder equal to, inside or containing any of ``inputs`` (model, direction, SAE, prompt files...).
    """
    target = Path(out_dir).expanduser().absolute()
    _restore_stranded(target)
    real = target.resolve()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{flag} {out_dir} is an existing file, not a folder; choose a new folder name.")
    if _inside(Path.cwd().resolve(), real):
        raise UserError(f"{flag} {out_dir} is the current folder or contains it; choose a new folder name.")
    for inp in inputs:
        if inp is None or not str(inp) or not Path(inp).expanduser().exists():
            continue
        src = Path(inp).expanduser().resolve()
        if _inside(src, real) or _inside(real, src):
            raise UserError(
                f"{flag} {out_dir} overlaps the input {inp} (equal, inside or containing it); "
                "choose an output folder outside your inputs."
            )
    busy = [(p, pid) for p, pid in _leftovers(target, STAGE_TAG) if pid != os.getpid() and _pid_alive(pid)]
    if busy:
        raise UserError(
            f"{flag} {out_dir} is being written by another run (pid {busy[0][1]}, into {busy[0][0].name}); wait "
            "for it, or delete that folder if no refusal-lens run is active."
        )
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise UserError(
            f"{flag} {out_dir} already holds files; pass --overwrite to replace it, or choose another folder."
        )
    _check_writable(target, flag)
    return target


def _check_writable(target: Path, flag: str) -> None:
    """Fail now, not after hours of work, if nothing can be created where ``target`` goes."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=parent)  # os.access says yes to root
        os.rmdir(probe)
    except OSError as exc:
        raise UserError(f"cannot write {flag} {target} ({exc.strerror}); choose a writable folder.") from None


def _writable_parent(target: Path, flag: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {flag} {target} ({exc.strerror}); choose a writable folder.") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {target}: {target.parent} is not writable; choose a writable folder.")


@contextmanager
def staging_dir(
    out_dir: PathLike,
    overwrite: bool = False,
    inputs: Sequence[PathLike | None] = (),
    *,
    resume: bool = False,
    keep_on_interrupt: bool = False,
    flag: str = "--out",
) -> Iterator[Path]:
    """Build an output folder atomically.

    Yields a staging folder ``.<name>.partial-<pid>`` beside ``out_dir``. If the block succeeds it replaces
    ``out_dir``; if it raises, it is deleted and ``out_dir`` is left as it was. ``out_dir`` is checked first
    with :func:`check_out_dir` (a non-empty folder needs ``overwrite``). Staging folders of killed runs are
    removed; with ``resume`` the newest one is adopted instead (its files are in the yielded folder). With
    ``keep_on_interrupt`` a Ctrl-C keeps the staging folder for a later ``resume``.
    """
    target = check_out_dir(out_dir, overwrite, inputs, flag)
    _writable_parent(target, flag)
    stage = target.with_name(f".{target.name}{STAGE_TAG}{os.getpid()}")
    _rmtree(stage)  # our own pid: a leftover of an earlier block in this process
    adopted = clean_stale(target, keep_newest_stage=resume)
    try:
        if adopted is not None:
            os.replace(adopted, stage)
        else:
            stage.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write {flag} {target} ({exc.strerror}); choose a writable folder.") from None
    try:
        yield stage
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            _rmtree(stage)
        raise
    except BaseException:
        _rmtree(stage)
        raise
    try:
        if target.exists():
            old = target.with_name(f".{target.name}{OLD_TAG}{os.getpid()}")
            os.replace(target, old)
            os.replace(stage, target)
            _rmtree(old)
        else:
            os.replace(stage, target)
    except OSError as exc:
        _rmtree(stage)
        raise UserError(f"cannot replace {flag} {target} ({exc.strerror}); choose another folder.") from None


def check_out_file(
    out_file: PathLike, overwrite: bool = False, inputs: Sequence[PathLike | None] = (), flag: str = "--out"
) -> Path:
    """Refuse an output *file* that is a folder, an input, or (without ``overwrite``) an existing file."""
    target = Path(out_file).expanduser().absolute()
    if target.is_dir():
        raise UserError(f"{flag} {out_file} is a folder; give a file name.")
    for inp in inputs:
        if inp is not None and str(inp) and Path(inp).expanduser().exists():
            if _inside(target.resolve(), Path(inp).expanduser().resolve()):
                raise UserError(f"{flag} {out_file} is (inside) the input {inp}; choose another file.")
    if target.exists() and not overwrite:
        raise UserError(f"{flag} {out_file} already exists; pass --overwrite to replace it, or choose another name.")
    _check_writable(target, flag)
    return target


def _created() -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (the reproducible-builds convention: byte-identical reruns)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        if epoch and epoch.isdigit()
        else _dt.datetime.now(_dt.timezone.utc)
    )
    return when.isoformat(timespec="seconds")


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions, time and host facts to store beside every artifact, plus ``extra``."""
    import transformers

    from .. import __version__

    info: dict[str, Any] = {
        "refusal_lens_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "created": _created(),
    }
    info.update(extra)
    return info
