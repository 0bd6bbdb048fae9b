"""The baselines of the book's chapter 3: one entry per name, with a one-line description and its reference.

This module imports nothing heavy, so the CLI can offer the names as choices and the tables can
print descriptions and references without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from h3fusion.errors import H3FusionError

Kind = Literal["merge", "ensemble", "data-mix", "instruct"]
"""How a baseline combines the three tasks: merging the experts, ensembling them, one model trained on the mixed
data, or a model fusing their answers."""


class UnknownBaselineError(H3FusionError, KeyError):
    """A baseline name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Baseline:
    """A baseline: what it is called, what it does, and where it comes from."""

    name: str
    kind: Kind
    description: str
    reference: str
    """Paper title and arXiv id (or `this companion` for what the paper describes without a recipe)."""


_ENTRIES = (
    Baseline(
        "merge-average",
        "merge",
        "weight averaging: base + mean of the experts' full LoRA deltas (a uniform model soup)",
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
        "inference time (Wortsman et al.), arXiv 2203.05482",
    ),
    Baseline(
        "merge-task-arithmetic",
        "merge",
        "task arithmetic: base + lambda * sum of the experts' full deltas (task vectors)",
        "Editing Models with Task Arithmetic (Ilharco et al.), arXiv 2212.04089",
    ),
    Baseline(
        "merge-ties",
        "merge",
        "TIES: trim each delta to its largest-magnitude entries, elect a sign per entry, mean of the agreeing entries",
        "TIES-Merging: Resolving Interference When Merging Models (Yadav et al.), arXiv 2306.01708",
    ),
    Baseline(
        "merge-dare",
        "merge",
        "DARE: drop delta entries at random (seeded) and rescale the rest by 1/(1-p), then task arithmetic",
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
        "(Yu et al.), arXiv 2311.03099",
    ),
    Baseline(
        "ensemble-uniform",
        "ensemble",
        "token-level ensemble: the experts' next-token distributions averaged with equal weights",
        "Pack of LLMs: Model Fusion at Test-Time via Perplexity Optimization (Mavromatis et al.), arXiv 2404.11531 "
        "(uniform-weight ensemble baseline)",
    ),
    Baseline(
        "ensemble-packllm",
        "ensemble",
        "token-level ensemble weighted per prompt by softmax(-log perplexity / tau) of each expert (PackLLM-sim)",
        "Pack of LLMs: Model Fusion at Test-Time via Perplexity Optimization (Mavromatis et al.), arXiv 2404.11531",
    ),
    Baseline(
        "ensemble-select",
        "ensemble",
        "output-level ensemble: every expert answers; the answer the experts jointly find most likely (mean "
        "per-token log-likelihood under their uniform mixture) is kept. No judge selects, so none scores its own pick",
        "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned LLMs (Tekin et al.), arXiv 2411.17792 "
        "(ensemble baseline; the selection rule is this companion's)",
    ),
    Baseline(
        "lora-data-mix",
        "data-mix",
        "one LoRA (the experts' config) trained like an expert on the mix of the three datasets that fusion trains "
        "on, for the experts' and fusion's steps together (tasks x experts.train + fusion.train steps; chapter 3 prints "
        "the profile's) at the experts' batch size and learning rate, merged into a dense model",
        "Mix Data or Merge Models? Balancing the Helpfulness, Honesty, and Harmlessness of Large Language Model via "
        "Model Merging (Yang et al.), arXiv 2502.06876",
    ),
    Baseline(
        "instruct-zeroshot",
        "instruct",
        "H3Fusion-Instruct: the base model, prompted zero-shot, fuses the experts' answers into one",
        "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned LLMs (Tekin et al.), arXiv 2411.17792 "
        "(prompting variant; the prompt is this companion's)",
    ),
    Baseline(
        "instruct-lora",
        "instruct",
        "H3Fusion-Instruct with a LoRA-tuned fuser trained to turn the experts' answers into the reference answer",
        "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned LLMs (Tekin et al.), arXiv 2411.17792 "
        "(prompting variant; the prompt and fuser training are this companion's)",
    ),
)

BASELINES: dict[str, Baseline] = {b.name: b for b in _ENTRIES}
"""Every baseline by name, in the order the tables show them."""


def baseline_names() -> tuple[str, ...]:
    return tuple(BASELINES)


def get_baseline(name: str) -> Baseline:
    """The registry entry for `name`; an unknown name lists the known ones."""
    try:
        return BASELINES[name]
    except KeyError:
        raise UnknownBaselineError(
            f"unknown baseline {name!r}; known baselines: {', '.join(BASELINES)}"
        ) from None
