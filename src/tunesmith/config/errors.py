"""The config's error type and its once-per-process notices."""

from __future__ import annotations

import logging
import warnings

from tunesmith.common import once

logger = logging.getLogger("tunesmith.config")


def deprecation_notice(key: str, message: str) -> None:
    """Warn once per process per `key` (a FutureWarning, like TRL's own deprecations)."""
    if once(("notice", key)):
        warnings.warn(message, FutureWarning, stacklevel=3)


def notice_once(key: str, message: str) -> None:
    """Log `message` once per process per `key` (a setting accepted and mapped, not deprecated)."""
    if once(("notice", key)):
        logger.warning(message)


class ConfigError(ValueError):
    """A configuration problem, with where it is and how to fix it."""
