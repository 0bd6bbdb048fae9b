"""A content-addressed store of generated answers, at the language-model level.

Why: the output-level baselines (ensemble-select, H3Fusion-Instruct) start from every expert's answer to the
prompts they are asked, which are the prompts the experts answer in their own evaluation. Whichever generates an
expert's answers first stores them here under the expert's identity; the other reads them, so no stage has to read
another stage's files or run it first.

A key is one generation call: the model's identity (`artifacts.artifact_identity` of its manifest, so a re-trained
model misses), the generation config, the seed, the stop strings and the prompts *in order*. The whole list is the
key, not each prompt: batching (which prompts share a padded batch) can move a greedy answer at the rounding level,
so only the same list is certain to give the same tokens again. Files are written atomically, so concurrent
evaluations may share the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from h3fusion.artifacts import atomic_write_text
from h3fusion.config import GenerationConfig

CACHE_FORMAT = 2
"""Bump when what a stored answer means changes (decoding rules, batching, answer post-processing); 2: batches
planned by cost (`h3fusion.evaluation.generate.generation_batches`)."""


@dataclass(frozen=True)
class GenerationCall:
    """What decides a generation's answers besides the model: the prompts in order, the config, the seed and the
    stop strings."""

    prompts: tuple[str, ...]
    cfg: GenerationConfig
    seed: int
    stop_strings: tuple[str, ...]

    @classmethod
    def of(
        cls, prompts: Sequence[str], cfg: GenerationConfig, seed: int, stop_strings: Sequence[str]
    ) -> GenerationCall:
        return cls(tuple(prompts), cfg, seed, tuple(stop_strings))

    def key(self, identity: str) -> str:
        """The digest of this call by the model IDENTITY."""
        head = [CACHE_FORMAT, identity, self.cfg.model_dump(mode="json"), self.seed, list(self.stop_strings)]
        h = hashlib.sha256(json.dumps([*head, len(self.prompts)]).encode())
        for p in self.prompts:
            h.update(b"\0p" + p.encode())
        return h.hexdigest()[:32]


class GenerationCache:
    """`folder/<key>.json`: the answers of one generation call, one per prompt, in the prompts' order."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, identity: str, call: GenerationCall) -> Path:
        return self.folder / f"{call.key(identity)}.json"

    def get(self, identity: str, call: GenerationCall) -> list[str] | None:
        """The stored answers of this call, or None (a damaged file counts as missing)."""
        try:
            answers = json.loads(self.path(identity, call).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(answers, list) or len(answers) != len(call.prompts):
            return None
        return answers if all(isinstance(a, str) for a in answers) else None

    def answers(self, identity: str, call: GenerationCall, generate: Callable[[], list[str]]) -> list[str]:
        """The stored answers of this call, else `generate()`'s, stored."""
        hit = self.get(identity, call)
        if hit is None:
            hit = generate()
            self.put(identity, call, hit)
        return hit

    def put(self, identity: str, call: GenerationCall, answers: Sequence[str]) -> None:
        if len(answers) != len(call.prompts):
            raise ValueError(f"{len(answers)} answers for {len(call.prompts)} prompts")
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(identity, call), json.dumps(list(answers)))


def profile_generation_cache(run_dir: Path) -> GenerationCache:
    """The cache of one profile's runs folder (`runs/<profile>/cache/generations/`)."""
    return GenerationCache(Path(run_dir) / "cache" / "generations")
