"""Progress bars with one policy for every command.

On a terminal a bar redraws in place. Elsewhere (a CI log, a file, a pipe) every redraw would be a new line, so
bars are off there (the commands print their summaries either way); ``--quiet`` (:func:`set_quiet`) turns them
off on a terminal too, together with transformers' own weight-loading bars.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar of this process (ours and transformers')."""
    global _quiet
    _quiet = quiet
    if quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm`` under this module's policy (off when quiet or when stderr is not a terminal)."""
    return tqdm(iterable, disable=disable or _quiet or not sys.stderr.isatty(), **kwargs)
