"""A content-addressed store of per-token log-probabilities, at the language-model level.

Why: a token ensemble's likelihood of a text is a mixture of its experts' per-token probabilities, and the
experts score exactly the same (prompt, continuation) lists on the likelihood track when they are evaluated
themselves. Storing each call's per-token log-probabilities under the model's identity lets the ensembles mix
the experts' stored values instead of running every expert again (about 20 minutes of the cpu book).

A key is (model identity, the call's prompts and continuations): the identity is the artifact's
(`artifacts.artifact_identity`, so a re-trained model misses), the texts are hashed in order. Files are
written atomically, so concurrent evaluations may share the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from h3fusion.artifacts import atomic_write_text

CACHE_FORMAT = 1
"""Bump when what a stored value means changes (tokenisation of a pair, the scorer's definition)."""


def call_key(identity: str, prompts: Sequence[str], continuations: Sequence[str]) -> str:
    """The digest of one scoring call of one model."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{identity}\0{len(prompts)}".encode())
    for p, c in zip(prompts, continuations, strict=True):
        h.update(b"\0p" + p.encode() + b"\0c" + c.encode())
    return h.hexdigest()[:32]


class TokenLogprobCache:
    """`folder/<key>.json`: the per-token log-probabilities of one call, one list per pair."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, identity: str, prompts: Sequence[str], continuations: Sequence[str]) -> Path:
        return self.folder / f"{call_key(identity, prompts, continuations)}.json"

    def get(
        self, identity: str, prompts: Sequence[str], continuations: Sequence[str]
    ) -> list[list[float]] | None:
        """The stored values of this call, or None (a damaged file counts as missing)."""
        path = self._path(identity, prompts, continuations)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(values, list) or len(values) != len(prompts):
            return None
        return values

    def put(
        self,
        identity: str,
        prompts: Sequence[str],
        continuations: Sequence[str],
        values: Sequence[Sequence[float]],
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps([list(map(float, v)) for v in values], separators=(",", ":"))
        atomic_write_text(self._path(identity, prompts, continuations), text)


def profile_cache(run_dir: Path) -> TokenLogprobCache:
    """The cache of one profile's runs folder (`runs/<profile>/cache/token-logprobs/`)."""
    return TokenLogprobCache(Path(run_dir) / "cache" / "token-logprobs")
