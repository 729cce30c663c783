"""User-facing errors.

Every problem caused by the user's input (a missing file, an empty prompt list, a direction of the wrong
width, an unsupported architecture, NaN activations...) is raised as :class:`UserError` with one sentence
that names the input and says how to fix it. The CLI prints that sentence and exits with status 2; no
traceback wall.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the input and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
