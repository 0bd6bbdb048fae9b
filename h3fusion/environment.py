"""Environment variables set for a block and restored after it (child processes read them when they start)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str], keep_set: bool = False) -> Iterator[None]:
    """Set `values` in ``os.environ`` for the block, then restore what was there (unset stays unset);
    `keep_set`: leave variables the user already set untouched."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if not (keep_set and saved[k] is not None)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
