"""Stage 7, the ``refusal-lens`` command: one thin module per subcommand (``add_arguments`` and ``run``).

Commands parse options, load inputs with clear errors, call the stages below and write artifacts. They hold no
method logic of their own. :func:`main` is the console script's entry point.
"""

from .main import main

__all__ = ["main"]
