"""A per-project file lock that fails at once instead of waiting: two trainings, or two syncs, of one project
must not run together, and the second one should say so (and be retried) rather than queue up silently."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); raise ``busy()`` when someone else holds it.

    flock locks die with their process, so a crashed holder never leaves the project locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy() from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
