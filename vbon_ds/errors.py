"""The one exception type the CLI turns into a one-line message and exit code 2, and the disk-full guard."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class VbonError(Exception):
    """A user-facing error: bad config, bad input data, missing file. The message says what to fix."""


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk (or an exhausted quota) while writing `path` into a one-line VbonError."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VbonError(
                f"no space left on device while writing {path} ({os.strerror(err.errno)}); "
                "free some space and rerun: completed work is kept"
            ) from None
        raise
