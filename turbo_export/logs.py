"""Quieter third-party loggers for the length of a block (exporters, quantizers and hubs log every step)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quieted(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers (the root logger for "") to ``level``, and restore them after."""
    loggers = [logging.getLogger(name or None) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)
