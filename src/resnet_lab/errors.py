"""Errors that mean bad input (ours, and OmegaConf's missing or mistyped keys), and the command-line
wrapper that turns them into one line and exit 2.

Anything else is a bug and keeps its traceback. `RESNET_LAB_DEBUG=1` shows the traceback for bad input too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A configuration value, path or command-line argument that cannot work."""


class DataError(RuntimeError):
    """A dataset that cannot be built, read or trusted (download failed, checksum mismatch)."""


def cli(func: Callable[..., T]) -> Callable[..., T]:
    """Decorate a `main()`: bad input prints `error: <message>` on one line and exits with status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, DataError, OmegaConfBaseException) as exc:
            if os.environ.get("RESNET_LAB_DEBUG"):
                raise
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper
