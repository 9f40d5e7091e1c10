"""The pieces every config section is built from: the option helper and the two error kinds.

They live apart from ``config.py`` so that sections kept in their own modules (``learner_config``)
can use them without importing ``config`` (which imports those sections).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad option; its message is one line meant for the user."""


class RunError(RuntimeError):
    """A run stopped for a reason its first line tells the user (the CLI prints it, exit 1); any
    further lines are detail, such as a rank's traceback."""


def opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False) -> Any:
    """A config field with its one-line doc and an allowed numeric range."""
    meta = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
