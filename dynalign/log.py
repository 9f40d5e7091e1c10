"""dynalign's console messages: the ``dynalign`` logger hierarchy (``logging.getLogger(__name__)``
in each module) with one handler, set up when the package is imported and again by the CLI
(``logging.level``, ``--verbose``).

    INFO     dynalign: <message>              on stdout
    WARNING  dynalign: warning: <message>     on stderr (ERROR, DEBUG likewise, with their name)

The handler looks up ``sys.stdout``/``sys.stderr`` when it writes, so redirected or captured
streams (pytest's capsys) see the messages. Records still propagate to the root logger (caplog).
The run summary and the progress bar are the console's product, not log messages: printed.
"""

from __future__ import annotations

import logging
import sys

ROOT = "dynalign"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{ROOT}: " if record.levelno == logging.INFO else f"{ROOT}: {record.levelname.lower()}: "
        return prefix + record.getMessage()


class ConsoleHandler(logging.Handler):
    """INFO and below to the current ``sys.stdout``, WARNING and above to the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "INFO", verbose: bool = False) -> logging.Logger:
    """Attach the one console handler to the ``dynalign`` logger (replacing an earlier one) at
    ``level``; ``verbose`` shows DEBUG messages too."""
    if level not in LEVELS:
        raise ValueError(f"logging level {level!r}: expected one of {', '.join(LEVELS)}")
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(ConsoleFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    return logger
