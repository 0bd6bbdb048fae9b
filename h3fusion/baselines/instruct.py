"""H3Fusion-Instruct (book chapter 3): a fuser model reads the request and the experts' answers, writes the final answer.

Two fusers share one `AdapterBank` (base weights loaded once): (a) the base model prompted zero-shot (every
adapter disabled); (b) a LoRA fuser trained here on training prompts of every task: the experts answer them,
the fuser learns to turn (request, answers) into the reference answer (loss on the answer only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.baselines.answers import KnownAnswers, expert_answers
from h3fusion.baselines.ensembles import AdapterBank
from h3fusion.config import GenerationConfig, LoraConfig, TrainConfig
from h3fusion.data import TrainExample, format_prompt, split_prompt, tokenize_example
from h3fusion.data.template import is_formatted_prompt
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
from h3fusion.evaluation.lm import HFLanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FUSER_INSTRUCTION = (
    "Several assistants answered the request below. Write one final answer to the request that is helpful, "
    "harmless and honest: keep what is useful and correct, leave out anything unsafe or untrue, and do not "
    "mention the assistants."
)
FUSER_INPUT = "Request:\n{request}\n\n{answers}"
FUSER_ANSWER = "Answer of the {task} assistant:\n{answer}"
FUSER_PROMPT_TEMPLATE = format_prompt(FUSER_INSTRUCTION, FUSER_INPUT)
"""The H3Fusion-Instruct prompt, in full (the Alpaca template with the fusion request as its instruction and the
request plus one `FUSER_ANSWER` block per expert, blank-line separated, as its input).

This prompt is OURS: the paper shows its prompt only as an example in its Figure 5, whose text is not available
to us. The book prints this constant."""

_QA_TAIL = re.compile(r"(?:^|\n)Q: (?P<question>[^\n]*)\nA:$")


def instruction_prompt(prompt: str, continuation: str) -> tuple[str, str]:
    """A multiple-choice pair in the experts' format. A few-shot "Q: ... A:" prompt (`evaluation.mc_prompt: qa6`)
    becomes the Alpaca prompt of its last question and the choice loses its leading space: the experts answer the
    question as they were aligned to (their cached evaluation answers to it are reused) and the fuser reads the
    question, not the demonstrations. Any other pair is returned as it is."""
    m = _QA_TAIL.search(prompt)
    if m is None or is_formatted_prompt(prompt):
        return prompt, continuation
    return format_prompt(m.group("question")), continuation.removeprefix(" ")


def fuser_input(request: str, answers: Mapping[str, str]) -> str:
    blocks = "\n\n".join(
        FUSER_ANSWER.format(task=t, answer=a.strip() or "(no answer)") for t, a in answers.items()
    )
    return FUSER_INPUT.format(request=request, answers=blocks)


def fuser_prompt(request: str, answers: Mapping[str, str]) -> str:
    """The fuser's prompt for one request and the experts' answers ({expert name: answer})."""
    return format_prompt(FUSER_INSTRUCTION, fuser_input(request, answers))


class InstructFusion:
    """H3Fusion-Instruct as a `LanguageModel`: experts answer, then the fuser (base or LoRA adapter) writes.

    `continuation_logprobs` scores a continuation under the fuser given the fuser prompt, whose candidate
    answers are generated once per distinct prompt (greedy, `candidate_cfg`) and cached. The experts' answers
    come from `known` (the generation cache under the experts' identities) when it holds them, see `expert_answers`.
    """

    def __init__(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        experts: Sequence[str],
        candidate_cfg: GenerationConfig,
        *,
        fuser: str | None = None,
        seed: int = 0,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        known: KnownAnswers | None = None,
        progress: bool = True,
    ) -> None:
        missing = [n for n in [*experts, *([fuser] if fuser else [])] if n not in bank.model.peft_config]
        if missing:
            raise ValueError(
                f"adapters {missing} are not loaded in the bank ({list(bank.model.peft_config)})"
            )
        self.bank, self.tokenizer, self.experts = bank, tokenizer, tuple(experts)
        self.fuser, self.candidate_cfg, self.seed = fuser, candidate_cfg, seed
        self.stop_strings, self.progress, self.known = tuple(stop_strings), progress, known
        self._candidates: dict[str, dict[str, str]] = {}
        self.last_prompts: list[str] = []

    def candidates(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[dict[str, str]]:
        """Each expert's answer to each prompt, {expert: answer} per prompt (cached per prompt, config and seed)."""
        tag = f"{cfg.model_dump_json()}|{seed}|"
        todo = [p for p in dict.fromkeys(prompts) if tag + p not in self._candidates]
        if todo:
            per_expert = expert_answers(
                self.bank,
                self.tokenizer,
                self.experts,
                todo,
                cfg,
                seed,
                stop_strings=self.stop_strings,
                known=self.known,
                progress=self.progress,
            )
            for i, p in enumerate(todo):
                self._candidates[tag + p] = {e: per_expert[e][i] for e in self.experts}
        return [self._candidates[tag + p] for p in prompts]

    def fuser_prompts(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[str]:
        return [
            fuser_prompt(split_prompt(p), c)
            for p, c in zip(prompts, self.candidates(prompts, cfg, seed), strict=True)
        ]

    def _fuser_lm(self) -> HFLanguageModel:
        if self.fuser is not None:
            self.bank.use(self.fuser)
        return HFLanguageModel(
            self.bank.model, self.tokenizer, stop_strings=self.stop_strings, progress=self.progress
        )

    def generate(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[str]:
        fused = self.fuser_prompts(prompts, cfg, seed)
        self.last_prompts = fused
        if self.fuser is None:
            with self.bank.base():
                return self._fuser_lm().generate(fused, cfg, seed, desc="fuse (zero-shot)")
        return self._fuser_lm().generate(fused, cfg, seed, desc="fuse (LoRA fuser)")

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        pairs = [instruction_prompt(p, c) for p, c in zip(prompts, continuations, strict=True)]
        prompts, continuations = [p for p, _ in pairs], [c for _, c in pairs]
        fused = self.fuser_prompts(prompts, self.candidate_cfg, self.seed)
        if self.fuser is None:
            with self.bank.base():
                return self._fuser_lm().continuation_logprobs(fused, continuations)
        return self._fuser_lm().continuation_logprobs(fused, continuations)


# ---------------------------------------------------------------------------------------------- fuser training


def fuser_examples(
    fusion: InstructFusion, examples: Sequence[TrainExample], cfg: GenerationConfig, seed: int
) -> list[TrainExample]:
    """Training examples of the fuser: (fusion request with the experts' answers) -> the reference answer."""
    prompts = [format_prompt(ex.instruction, ex.input) for ex in examples]
    cands = fusion.candidates(prompts, cfg, seed)
    return [
        TrainExample(ex.task, FUSER_INSTRUCTION, fuser_input(split_prompt(p), c), ex.output)
        for ex, p, c in zip(examples, prompts, cands, strict=True)
    ]


def train_fuser(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainExample],
    lora: LoraConfig,
    train: TrainConfig,
    max_length: int,
    seed: int,
    name: str = "fuser",
) -> list[dict[str, float]]:
    """Add a LoRA adapter `name` to the bank and train it on `examples` (loss on the answer) with the Trainer,
    exactly as the experts train (schedule, warm-up, clipping, accumulation); returns the loss log."""
    import tempfile

    import torch
    from peft import LoraConfig as PeftLoraConfig
    from transformers import Trainer

    from h3fusion.data import PadCollator
    from h3fusion.experts import LMCollator
    from h3fusion.training import hide_progress, loss_log, training_arguments

    items = [t for t in (tokenize_example(tokenizer, ex, max_length) for ex in examples) if t is not None]
    if not items:
        raise ValueError("no fuser training example has an answer token left; raise data.max_length")
    model = bank.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(
            name,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    bank.use(name)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{name}." in n)
    with tempfile.TemporaryDirectory(prefix="h3fusion-fuser-") as work:
        trainer = Trainer(
            model=model,
            args=training_arguments(train, seed, Path(work), save_strategy="no"),
            train_dataset=items,
            data_collator=LMCollator(PadCollator(tokenizer.pad_token_id)),
        )
        hide_progress(trainer)
        trainer.train()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return loss_log(trainer)


def write_fuser_examples(path: Path, examples: Sequence[TrainExample]) -> None:
    with path.open("w") as fh:
        for ex in examples:
            row: dict[str, Any] = {
                "task": ex.task,
                "prompt": format_prompt(ex.instruction, ex.input),
                "target": ex.output,
            }
            fh.write(json.dumps(row) + "\n")
