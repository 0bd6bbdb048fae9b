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
REST_GROUP_ROWS = 16
"""Continuations scored together after their cached prompts (sorted by length, so little padding)."""


class HFLanguageModel:
    """A Hugging Face causal LM + tokenizer as a `LanguageModel`.

    `continuation_logprobs` runs each distinct prompt once (left-padded batch of prompts, KV cache kept) and then
    all of that prompt's continuations against the cached prompt, instead of re-encoding the prompt once per
    answer choice: TruthfulQA has about 12 choices per question, so this saves most of the compute. The token
    prefix that all the prompts share (the six TruthfulQA demonstrations, the Alpaca preamble) is run once per
    call and its keys/values reused by every batch (``share_prompt_prefix``): with the 6-shot MC prompt that
    prefix is most of each prompt.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        logprob_batch_size: int = 64,
        share_prompt_prefix: bool = True,
        progress: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.logprob_batch_size = logprob_batch_size
        self.share_prompt_prefix = share_prompt_prefix
        self.progress = progress

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
        return generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            cfg,
            seed,
            stop_strings=self.stop_strings,
            desc=desc,
            progress=self.progress,
        )

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """log p(continuation | prompt) per pair: the sum of its tokens' log-probabilities."""
        return [float(sum(t)) for t in self.continuation_token_logprobs(prompts, continuations)]

    def continuation_token_logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        """log p(token t | prompt, tokens < t) for each token of each continuation (what a mixture of models
        needs: it mixes probabilities token by token)."""
        import torch

        from h3fusion.progress import progress

        if len(prompts) != len(continuations):
            raise ValueError(
                f"{len(prompts)} prompts but {len(continuations)} continuations; pass one per pair"
            )
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        out: list[list[float]] = [[] for _ in prompts]
        chunks = self._chunks(list(groups.items()))
        with torch.inference_mode():
            prefix = self._shared_prefix(encode_prompts(self.tokenizer, list(groups)))
            for chunk in progress(chunks, desc="log-likelihoods", show=self.progress, unit="batch"):
                scores = self._score_chunk(
                    [p for p, _ in chunk], [[continuations[i] for i in idx] for _, idx in chunk], prefix
                )
                for (_, idx), group_scores in zip(chunk, scores, strict=True):
                    for i, s in zip(idx, group_scores, strict=True):
                        out[i] = s
        return out

    def _chunks(self, groups: list[tuple[str, list[int]]]) -> list[list[tuple[str, list[int]]]]:
        """Groups of prompts whose continuations together fit in one batch (a large group goes alone)."""
        chunks: list[list[tuple[str, list[int]]]] = []
        current: list[tuple[str, list[int]]] = []
        size = 0
        for group in groups:
            if current and size + len(group[1]) > self.logprob_batch_size:
                chunks.append(current)
                current, size = [], 0
            current.append(group)
            size += len(group[1])
        if current:
            chunks.append(current)
        return chunks

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

        if not self.share_prompt_prefix or len(encoded) < 2 or not all(encoded):
            return None
        first, length = encoded[0], min(len(e) for e in encoded) - 1
        for e in encoded[1:]:
            length = next((i for i in range(length) if e[i] != first[i]), length)
        if length < MIN_SHARED_PREFIX_TOKENS:
            return None
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
        return _SharedPrefix(length, _output_cache(out), logp[-1], own)

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
            inputs.update({_cache_argument(self.model): shared.cache_for(len(rest)), "use_cache": True})
        inputs["attention_mask"] = mask
        return ids, inputs

    def _score_chunk(
        self, prompts: list[str], conts: list[list[str]], shared: _SharedPrefix | None = None
    ) -> list[list[list[float]]]:
        """Token log-probabilities of each prompt's continuations: one prompt pass (after the shared prefix's
        cached keys/values, if any), one continuation pass."""
        import torch

        if any(not p for p in prompts):
            raise ValueError("an empty prompt has no next-token distribution to score a continuation with")
        pairs = [
            [split_continuation(self.tokenizer, p, c) for c in cs]
            for p, cs in zip(prompts, conts, strict=True)
        ]
        ctx_ids = [
            pairs_p[0][0] if pairs_p else encode_prompts(self.tokenizer, [p])[0]
            for p, pairs_p in zip(prompts, pairs, strict=True)
        ]
        skip = shared.length if shared is not None else 0
        ids, inputs = self._after_prefix([c[skip:] for c in ctx_ids], shared)
        mask, positions = inputs["attention_mask"], inputs["position_ids"]
        prefix = self.model(input_ids=ids, **{**inputs, "use_cache": True}, logits_to_keep=1)
        last_logp = torch.log_softmax(prefix.logits[:, -1, :].float(), dim=-1)  # [P, V]

        rows = [(p, j) for p, pairs_p in enumerate(pairs) for j in range(len(pairs_p))]
        cont_ids = [pairs[p][j][1] for p, j in rows]
        scores: list[list[list[float]]] = [[[] for _ in pairs_p] for pairs_p in pairs]
        if not rows:
            return scores
        owner = torch.tensor([p for p, _ in rows], device=self.device)
        first = torch.tensor([c[0] if c else 0 for c in cont_ids], device=self.device)
        first_lp = last_logp[owner, first].tolist()  # log p(first continuation token | prompt)
        rest_lp = self._rest_logprobs(_output_cache(prefix), owner, mask, positions, cont_ids)
        for r, (p, j) in enumerate(rows):
            if cont_ids[r]:
                scores[p][j] = [first_lp[r], *rest_lp[r]]
        return scores

    def _rest_logprobs(
        self,
        cache: object,
        owner: torch.Tensor,
        prompt_mask: torch.Tensor,
        prompt_positions: torch.Tensor,
        cont_ids: list[list[int]],
    ) -> list[list[float]]:
        """log p(token t | prompt, tokens < t) for t >= 1 of each continuation, against its prompt's cached
        keys/values. Continuations run in length-sorted groups of `REST_GROUP_ROWS` (right-padded): answer
        choices range from 2 to 30 tokens, and one batch padded to the longest cost 2.6x the needed compute."""
        import copy

        import torch

        out: list[list[float]] = [[] for _ in cont_ids]
        order = sorted((r for r, c in enumerate(cont_ids) if len(c) > 1), key=lambda r: len(cont_ids[r]))
        for s in range(0, len(order), REST_GROUP_ROWS):
            group = order[s : s + REST_GROUP_ROWS]
            width = max(len(cont_ids[r]) for r in group) - 1
            inp = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            tgt = torch.zeros((len(group), width), dtype=torch.long)
            for row, r in enumerate(group):
                c = cont_ids[r]
                inp[row, : len(c) - 1] = torch.tensor(c[:-1])
                tgt[row, : len(c) - 1] = torch.tensor(c[1:])
            inp, tgt = inp.to(self.device), tgt.to(self.device)
            rows = owner[group]
            last_group = s + REST_GROUP_ROWS >= len(order)
            group_cache = cache if last_group else copy.deepcopy(cache)  # the forward appends to its cache
            group_cache.batch_select_indices(rows)  # the prompt's keys/values, one copy per continuation
            attn = torch.cat([prompt_mask[rows], torch.ones_like(inp)], dim=1)
            positions = prompt_positions[rows, -1:] + 1 + torch.arange(width, device=self.device)
            logits = self.model(
                input_ids=inp,
                attention_mask=attn,
                position_ids=positions,
                use_cache=True,
                **{_cache_argument(self.model): group_cache},
            ).logits
            logp = (
                torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1).tolist()
            )
            for row, r in enumerate(group):
                out[r] = logp[row][: len(cont_ids[r]) - 1]
        return out


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


def _cache_argument(model: PreTrainedModel) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier 5.x), whichever the forward takes.

    A wrapper whose forward only has **kwargs (the MoE model) passes them to a transformers model: use the name
    the installed transformers' Llama takes.
    """
    import inspect

    from transformers import LlamaForCausalLM

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _output_cache(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
