"""The language-model interface the evaluation uses, so single models and ensembles plug in the same way.

Evaluation needs two things from a model: answers to prompts (`generate`) and log-likelihoods of given
continuations (`continuation_logprobs`, for TruthfulQA MC1/MC2). `HFLanguageModel` implements both for any
Hugging Face causal LM (a dense Llama, a peft-merged expert, a Mixtral-format fused model); ensembles implement
the same two methods in the baselines module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from h3fusion.config import GenerationConfig
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS, encode_prompts, generate_texts, left_pad

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from h3fusion.evaluation.generation_cache import GenerationCache
    from h3fusion.evaluation.logprob_cache import TokenLogprobCache


@runtime_checkable
class LanguageModel(Protocol):
    """What evaluation asks of a model (single model or ensemble)."""

    def generate(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[str]:
        """One answer per prompt, in order; greedy when `cfg.temperature == 0`, else sampling seeded by `seed`."""
        ...

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """sum_t log p(continuation token t | prompt, earlier continuation tokens), one float per pair."""
        ...


def split_continuation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids), tokenised separately exactly as training tokenises (prompt, response).

    Training (`h3fusion.data.tokenize_example`) concatenates the separately tokenised prompt and response, so
    scoring an answer the same way measures the likelihood of the token sequence the experts were trained on.
    """
    ctx = encode_prompts(tokenizer, [prompt])[0]
    return ctx, list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


MIN_SHARED_PREFIX_TOKENS = 16
"""A token prefix common to every prompt of a scoring call is run once when it is at least this long."""
ROW_TOKENS = 512
"""About how many continuation tokens share one packed row with their prompt's tail (see `_score_rows`)."""


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Tokens common to the start of every prompt, leaving at least one of each outside; 0 when fewer than
    `MIN_SHARED_PREFIX_TOKENS` (or fewer than two prompts): what `HFLanguageModel` runs once per call."""
    if len(encoded) < 2 or not all(encoded):
        return 0
    first, length = encoded[0], min(len(e) for e in encoded) - 1
    for e in encoded[1:]:
        length = next((i for i in range(length) if e[i] != first[i]), length)
    return length if length >= MIN_SHARED_PREFIX_TOKENS else 0


class HFLanguageModel:
    """A Hugging Face causal LM + tokenizer as a `LanguageModel`.

    `continuation_logprobs` runs the token prefix that all prompts of a call share (the six TruthfulQA
    demonstrations, the Alpaca preamble) once and reuses its keys/values (``share_prompt_prefix``); then each
    distinct prompt's tail and all its continuations run packed in one row (`_score_rows`), rows sorted by
    length into batches of at most `logprob_batch_size` continuations and `logprob_batch_tokens` padded
    tokens; the LM head runs only where a continuation token is predicted. That reaches the throughput of a
    plain forward of the same tokens (`h3fusion bench`, likelihood scoring), where running every
    continuation against its own copy of the cached prompt ran at about 0.65x of it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        logprob_batch_size: int = 256,
        logprob_batch_tokens: int = 4096,
        share_prompt_prefix: bool = True,
        progress: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.logprob_batch_size = logprob_batch_size
        self.logprob_batch_tokens = logprob_batch_tokens
        self.share_prompt_prefix = share_prompt_prefix
        self.progress = progress
        self.logprob_cache: TokenLogprobCache | None = None
        self.generation_cache: GenerationCache | None = None
        self.identity: str | None = None

    def store_logprobs(self, cache: TokenLogprobCache, identity: str) -> None:
        """Keep every `continuation_token_logprobs` call's result in CACHE under IDENTITY (the model's artifact
        identity), and answer repeated calls from it: token ensembles mix their experts' stored values."""
        self.logprob_cache, self.identity = cache, identity

    def store_generations(self, cache: GenerationCache, identity: str) -> None:
        """Keep every `generate` call's answers in CACHE under IDENTITY (the model's artifact identity), and
        answer a repeated call from it: the output-level baselines read their experts' answers there."""
        self.generation_cache, self.identity = cache, identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def generate(
        self, prompts: list[str], cfg: GenerationConfig, seed: int, desc: str = "generate"
    ) -> list[str]:
        """One answer per prompt (`generate_texts`), through `generation_cache` when set."""
        from h3fusion.evaluation.generation_cache import GenerationCall

        def run() -> list[str]:
            stops, show = self.stop_strings, self.progress
            return generate_texts(
                self.model, self.tokenizer, prompts, cfg, seed, stop_strings=stops, desc=desc, progress=show
            )

        if self.generation_cache is None or self.identity is None:
            return run()
        return self.generation_cache.answers(
            self.identity, GenerationCall.of(prompts, cfg, seed, self.stop_strings), run
        )

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """log p(continuation | prompt) per pair: the sum of its tokens' log-probabilities."""
        return [float(sum(t)) for t in self.continuation_token_logprobs(prompts, continuations)]

    def continuation_token_logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        """log p(token t | prompt, tokens < t) for each token of each continuation (what a mixture of models
        needs: it mixes probabilities token by token). Read from and written to `logprob_cache` when set."""
        if len(prompts) != len(continuations):
            raise ValueError(
                f"{len(prompts)} prompts but {len(continuations)} continuations; pass one per pair"
            )
        cache, identity = self.logprob_cache, self.identity
        if cache is not None and identity is not None:
            hit = cache.get(identity, prompts, continuations)
            if hit is None:
                hit = self._continuation_token_logprobs(prompts, continuations)
                cache.put(identity, prompts, continuations, hit)
            return hit
        return self._continuation_token_logprobs(prompts, continuations)

    def _continuation_token_logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        import torch

        from h3fusion.progress import progress

        if any(not p for p in prompts):
            raise ValueError("an empty prompt has no next-token distribution to score a continuation with")
        out: list[list[float]] = [[] for _ in prompts]
        if not prompts:
            return out
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        encoded = encode_prompts(self.tokenizer, list(groups))
        cont_ids = self.tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            shared = self._shared_prefix(encoded)
            skip = shared.length if shared is not None else 0
            rows = [
                _PackedRow(enc[skip:], part, [cont_ids[i] for i in part])
                for enc, idx in zip(encoded, groups.values(), strict=True)
                for part in self._row_parts([i for i in idx if cont_ids[i]], cont_ids)
            ]
            batches = self._row_batches(rows)
            for batch in progress(batches, desc="log-likelihoods", show=self.progress, unit="batch"):
                for row, scores in zip(batch, self._score_rows(batch, shared), strict=True):
                    for i, s in zip(row.index, scores, strict=True):
                        out[i] = s
        return out

    def _row_parts(self, idx: list[int], cont_ids: list[list[int]]) -> list[list[int]]:
        """One prompt's (non-empty) continuations split into packed rows of at most `logprob_batch_size`
        continuations and about `ROW_TOKENS` tokens (attention within a row is quadratic)."""
        parts: list[list[int]] = []
        size = 0
        for i in idx:
            if parts and len(parts[-1]) < self.logprob_batch_size and size + len(cont_ids[i]) <= ROW_TOKENS:
                parts[-1].append(i)
                size += len(cont_ids[i])
            else:
                parts.append([i])
                size = len(cont_ids[i])
        return parts

    def _row_batches(self, rows: list[_PackedRow]) -> list[list[_PackedRow]]:
        """Rows sorted by length (little padding) in batches of at most `logprob_batch_size` continuations and
        `logprob_batch_tokens` padded tokens (a row that alone exceeds either goes alone)."""
        batches: list[list[_PackedRow]] = []
        conts = 0
        for row in sorted(rows, key=lambda r: -len(r)):
            if batches:
                width = len(batches[-1][0])  # the longest, rows come longest first
                fits = (len(batches[-1]) + 1) * width <= self.logprob_batch_tokens
                if fits and conts + len(row.index) <= self.logprob_batch_size:
                    batches[-1].append(row)
                    conts += len(row.index)
                    continue
            batches.append([row])
            conts = len(row.index)
        return batches

    def prompt_token_logprobs(self, prompts: list[str], batch_size: int = 16) -> list[list[float]]:
        """log p(token t | tokens < t) for every token t >= 1 of each prompt (PackLLM weighs experts by the
        prompt's perplexity). The shared prefix is scored once; `batch_size` prompts per pass of the rest (a pass
        keeps the logits of every position)."""
        import torch

        encoded = encode_prompts(self.tokenizer, prompts)
        out: list[list[float]] = []
        with torch.inference_mode():
            shared = self._shared_prefix(encoded, every_position=True)
            skip = shared.length if shared is not None else 0
            for s in range(0, len(encoded), batch_size):
                rest = [e[skip:] for e in encoded[s : s + batch_size]]
                ids, inputs = self._after_prefix(rest, shared)
                logits = self.model(input_ids=ids, **inputs).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                for row, r in enumerate(rest):
                    own = logp[row, logp.shape[1] - len(r) + 1 :].tolist() if len(r) > 1 else []
                    head = (
                        [*shared.token_logprobs, float(shared.next_logp[r[0]])] if shared is not None else []
                    )
                    out.append(head + own)
        return out

    def _shared_prefix(self, encoded: list[list[int]], every_position: bool = False) -> _SharedPrefix | None:
        """The token prefix common to all prompts (`encoded`) with its KV cache (one forward), or None when
        there is nothing worth sharing or sharing is off. At least one token of every prompt stays outside it
        (its logits score the first continuation token). `every_position`: keep the prefix's own token
        log-probabilities too."""
        import torch

        length = shared_prefix_length(encoded) if self.share_prompt_prefix else 0
        if not length:
            return None
        first = encoded[0]
        ids = torch.tensor([first[:length]], device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(length, device=self.device)[None],
            use_cache=True,
            logits_to_keep=0 if every_position else 1,  # 0: all positions
        )
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        own = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist() if every_position else []
        return _SharedPrefix(length, out.cache, logp[-1], own)

    def _after_prefix(
        self, rest: list[list[int]], shared: _SharedPrefix | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(input ids, forward arguments) of prompt tails after the shared prefix (whole prompts when there is
        none), left-padded: the attention mask covers [shared prefix][padding][tail], positions count on from
        the prefix, and the prefix's keys/values come as the cache."""
        import torch

        ids, mask = left_pad(rest, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        skip = shared.length if shared is not None else 0
        inputs: dict[str, Any] = {
            "position_ids": skip + (mask.cumsum(-1) - 1).clamp(min=0),
            "use_cache": False,
        }
        if shared is not None:
            mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, skip), mask], dim=1)
            inputs.update({"cache": shared.cache_for(len(rest)), "use_cache": True})
        inputs["attention_mask"] = mask
        return ids, inputs

    def _score_rows(self, batch: list[_PackedRow], shared: _SharedPrefix | None) -> list[list[list[float]]]:
        """Token log-probabilities of the continuations of each packed row in one forward.

        A row is [prompt tail][continuation 1 but its last token][continuation 2 ...]: every continuation
        attends to the shared prefix (cached keys/values), the prompt tail and its own earlier tokens (a 4D
        attention mask), at the positions it would have right after the prompt, so each prompt's tail runs
        once for all its continuations with no per-continuation copy of the prompt's keys/values. The LM head
        and the normaliser run only at the positions that predict a continuation token.
        """
        import torch

        skip = shared.length if shared is not None else 0
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        seg = torch.full((len(batch), width), -1, dtype=torch.long)  # 0: tail, k: continuation k, -1: padding
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        where: list[tuple[int, int, int]] = []  # (row, column that predicts it, token) per scored token
        for b, row in enumerate(batch):
            tail = len(row.tail)
            ids[b, :tail] = torch.tensor(row.tail)
            seg[b, :tail] = 0
            pos[b, :tail] = torch.arange(skip, skip + tail)
            keep[b, tail - 1] = True
            col = tail
            for k, c in enumerate(row.conts, start=1):
                n = len(c) - 1
                ids[b, col : col + n] = torch.tensor(c[:-1], dtype=torch.long)
                seg[b, col : col + n] = k
                pos[b, col : col + n] = torch.arange(skip + tail, skip + tail + n)
                keep[b, col : col + n] = True
                where.extend((b, col + t - 1 if t else tail - 1, tok) for t, tok in enumerate(c))
                col += n
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg == 0)[:, None, :])
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros((len(batch), 1, width, skip + width), dtype=dtype)
        mask[:, 0, :, skip:].masked_fill_(~allowed, torch.finfo(dtype).min)
        inputs: dict[str, Any] = {"use_cache": False}
        if shared is not None:
            inputs.update({"cache": shared.cache_for(len(batch)), "use_cache": True})
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            logits_to_keep=keep.to(self.device),
            **inputs,
        ).logits  # [kept positions, V], row-major
        flat = (keep.flatten().cumsum(0) - 1).view_as(keep).tolist()  # (row, column) -> index in logits
        at = torch.tensor([flat[b][c] for b, c, _ in where], device=self.device)
        tokens = torch.tensor([t for _, _, t in where], device=self.device)
        # the normaliser in blocks of rows that stay in cache: 2.4x faster than one logsumexp over all of them
        lse = torch.cat([torch.logsumexp(logits[s : s + 64].float(), -1) for s in range(0, len(logits), 64)])
        lp = (logits[at, tokens].float() - lse[at]).tolist()
        scores: list[list[list[float]]] = []
        offset = 0
        for row in batch:
            scores.append([])
            for c in row.conts:
                scores[-1].append(lp[offset : offset + len(c)])
                offset += len(c)
        return scores


class _PackedRow:
    """One prompt's tail (after the shared prefix) and some of its continuations (`index`: their positions in
    the call), scored together in one row."""

    def __init__(self, tail: list[int], index: list[int], conts: list[list[int]]) -> None:
        self.tail, self.index, self.conts = tail, index, conts

    def __len__(self) -> int:
        return len(self.tail) + sum(len(c) - 1 for c in self.conts)


class _SharedPrefix:
    """The first `length` tokens of every prompt in a scoring call: their keys/values (batch of one), the
    next-token log-probabilities after them, and (when asked for) their own token log-probabilities."""

    def __init__(
        self, length: int, cache: object, next_logp: torch.Tensor, token_logprobs: list[float]
    ) -> None:
        self.length, self._cache = length, cache
        self.next_logp, self.token_logprobs = next_logp, token_logprobs

    def cache_for(self, rows: int) -> object:
        """A fresh copy of the prefix cache for a batch of `rows` prompts (the forward appends to it)."""
        import copy

        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(rows)
        return cache
