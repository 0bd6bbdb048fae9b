"""Progress bars that a caller can hide and that `TQDM_DISABLE=1` always hides.

tqdm reads `TQDM_DISABLE` only when `disable` is not passed; every bar here passes it (to hide bars of short
loops), so this helper applies the environment variable too. `h3fusion run-notebooks` sets it for the kernels:
in an executed notebook a bar is hundreds of carriage-return lines, not progress.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def bars_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes"}


def progress(iterable: Iterable[Any] | None = None, *, show: bool = True, **kwargs: Any) -> Any:
    """`tqdm(iterable, **kwargs)`, hidden when `show` is false or TQDM_DISABLE is set."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show or bars_disabled(), **kwargs)
