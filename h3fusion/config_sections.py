"""The sections of a profile (`config.Profile`) that build the models: data, model, experts, fusion (those that
evaluate them are in `h3fusion.config_evaluation`). Each is a frozen pydantic model that refuses unknown keys;
`h3fusion.config` assembles them into a `Profile`, loads it from YAML and is where the rest of the package imports
them from."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from h3fusion.dimensions import DIMENSIONS
from h3fusion.sections import Section

TASKS: tuple[str, ...] = tuple(DIMENSIONS)
"""The registered alignment dimensions (`h3fusion.dimensions`), in the book's order; a profile's tasks are some of
them, and (with the default experts, one per task) a task's position in `tasks` is its expert index."""


def check_task_names(names: list[str] | dict[str, Any], key: str) -> None:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task name(s) {unknown} in `{key}`; allowed: {list(TASKS)}")


class DataConfig(Section):
    source: Literal["local", "hub"] = "local"
    """`local`: a folder laid out as data/README.md says (plain or xz files); `hub`: the Hugging Face hub."""
    dir: str | None = None
    """Local data folder; default: $H3FUSION_DATA_DIR, else the copies shipped in data/offline/."""
    max_length: int = Field(gt=8)
    train_examples: dict[str, int]
    """Training examples per dimension for both stages (capped by what the split holds); one entry per task of
    the profile at least."""
    eval_examples: dict[str, int]
    """Evaluation items per dimension (the paper: 50 AlpacaEval, all BeaverTails test, 409 TruthfulQA)."""
    eval_sample: Literal["stratified", "first"] = "stratified"
    """How evaluation items are drawn: a seeded sample stratified by each source's strata, or the first N of the
    file (the paper's rule for AlpacaEval; biased where a file is grouped, as TruthfulQA's is by category)."""
    beavertails_eval_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of BeaverTails prompts kept for evaluation when only 30k_test exists (split by prompt); the
    rest ("non_eval") trains the harmless expert (safe rows) and the harmlessness judge (all rows)."""

    @field_validator("train_examples", "eval_examples")
    @classmethod
    def _per_dimension(cls, v: dict[str, int], info: Any) -> dict[str, int]:
        key = f"data.{info.field_name}"
        check_task_names(v, key)
        negative = {t: n for t, n in v.items() if n < 0}
        if negative:
            raise ValueError(f"negative count(s) {negative} in `{key}`; use numbers >= 0")
        return v


class TinyModelConfig(Section):
    """Shape of the random Llama used by tests and the smoke profile."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(2048, gt=0)
    """The vocabulary is the real SmolLM2 tokenizer's (prompts tokenise as with the cpu profile)."""


class ModelConfig(Section):
    base: str
    """`tiny-random`, `smollm2-offline`, a Hugging Face hub id, or a local folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyModelConfig = TinyModelConfig()
    cache_dir: str | None = None
    """Where converted models are cached; default: ~/.cache/h3fusion."""


class LoraConfig(Section):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    """Set exactly one of `max_steps` and `epochs` (the paper trains 3 epochs)."""
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    save_steps: int = Field(50, gt=0)
    logging_steps: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of `max_steps` and `epochs`")
        return self


class ExpertSpec(Section):
    """One expert of the mixture: a LoRA adapter aligned on one dimension's training data."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    """The expert's name: its folder (runs/<profile>/experts/<name>), its model name in the evaluation tables and
    its key in `fusion.drift_gammas`."""
    dimension: str
    """The dimension (one of the profile's `tasks`) whose training data it is aligned on and whose prompts the
    gating loss routes to it."""
    seed: int | None = None
    """Seed of its training sample, LoRA initialisation and data order (None: the profile's seed). Two experts on
    one dimension need different seeds, or they are the same expert twice."""
    train_examples: int | None = Field(None, gt=0)
    """Training examples (None: `data.train_examples` of its dimension)."""
    lora: LoraConfig | None = None
    """Its own LoRA (None: `experts.lora`). Ranks and scales may differ between experts: the MoE stores the experts'
    factors zero-padded to the largest rank, which leaves every expert's delta exactly as trained."""

    @field_validator("dimension")
    @classmethod
    def _dimension(cls, v: str) -> str:
        check_task_names([v], "experts.members.dimension")
        return v


class ExpertsConfig(Section):
    lora: LoraConfig
    """The experts' LoRA (an expert of `members` may have its own)."""
    train: TrainConfig
    members: tuple[ExpertSpec, ...] | None = None
    """The experts, in the MoE's expert order. None: one expert per task of the profile, named after it (the
    paper's three)."""

    HASHED_WHEN_SET: ClassVar[tuple[str, ...]] = ("members",)

    @field_validator("members")
    @classmethod
    def _members(cls, v: tuple[ExpertSpec, ...] | None) -> tuple[ExpertSpec, ...] | None:
        if v is None:
            return v
        names = [e.name for e in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"`experts.members` repeats the name(s) {repeated}; give every expert its own name"
            )
        return v


class ReleasedCodeSwitches(Section):
    """Re-create the released code's bugs (book: released_code_bugs.md) to measure what each changes. All off = correct."""

    labels: bool = False
    """Mixed-dataset labels from a running total (honest samples labelled harmless)."""
    gating_loss: bool = False
    """Double softmax in the gating loss, padding tokens averaged in."""
    drift: bool = False
    """Penalise weight norms (frozen weights included) instead of drift from the upcycled experts."""
    frozen_router: bool = False
    """Keep every router at its random initialisation (the released code never trains or loads it)."""
    aliased_experts: bool = False
    """Every expert is the base plus the sum of all experts' deltas (the released code aliases the experts' weights
    to one tensor and adds each delta to it), so the experts differ only by their fusion LoRA."""
    unscaled_lora: bool = False
    """Upcycle the experts as W + B A, without LoRA's alpha / r scale (the released code drops it)."""

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("frozen_router", "aliased_experts", "unscaled_lora")
    """Switches that enter the artifacts' hashes only when on, so that models built before they existed stay valid."""
    UPCYCLING: ClassVar[tuple[str, ...]] = ("aliased_experts", "unscaled_lora")
    """Switches that change the upcycled (raw) MoE itself, not only its training."""
    CODES: ClassVar[dict[str, str]] = {
        "labels": "lab",
        "gating_loss": "gl",
        "drift": "dr",
        "frozen_router": "fr",
        "aliased_experts": "al",
        "unscaled_lora": "us",
    }
    """Short names of the switches in a variant's folder name."""

    def on(self, names: tuple[str, ...] | None = None) -> list[str]:
        """The switches that are on (among `names`; default all), in declaration order."""
        return [k for k in type(self).model_fields if getattr(self, k) and (names is None or k in names)]

    def hash_payload(self) -> dict[str, bool]:
        """The switches as hashed: every original one, the later ones only when on."""
        return {k: v for k, v in self.model_dump().items() if v or k not in self.ADDED_LATER}


class FusionConfig(Section):
    top_k: int = Field(2, gt=0)
    storage: Literal["delta", "materialised"] = "delta"
    router_init: Literal["random", "hidden"] = "random"
    router_init_examples: int = Field(32, gt=0)
    """Training prompts per task averaged for the `hidden` router init."""
    gate_weight: float = Field(ge=0)
    """lambda, the weight of the gating loss."""
    gate_averages: tuple[Literal["sequence", "prompt"], ...] = ("sequence", "prompt")
    """Token averages the gating loss routes (the mean of their -log P[y] terms): the whole sequence, and the prompt
    alone so that routing holds from the prompt on (generation starts there). The routing statistics use the
    same two masks. The paper's form is ("sequence",)."""
    gate_skip_template: bool = True
    """Leave the Alpaca template's shared header out of the gating loss's averages. The header is the same text
    for every task and comes first, so its hidden states (and any router's output on them) are the same whatever
    the task and no router can route it by task. Kept in, it adds the same router output to every item's average,
    so the loss asks the task's own tokens for a margin large enough to outweigh it: on the cpu profile that routed
    held-out harmless prompts better (the profile's comment and book chapter 4 have the runs)."""
    router_lr: float | None = Field(None, gt=0)
    """Learning rate of the routers' own optimiser group (None: `train.lr`, one group as in the paper)."""
    drift_gammas: dict[str, float]
    """gamma_i per expert (by name; missing: 0), the weight of expert i's drift penalty."""
    load_balance_weight: float = Field(0.0, ge=0)
    lora: LoraConfig
    """LoRA on the experts during fusion training (trained with the router)."""
    attention_lora: bool = False
    """Also LoRA-tune attention (the released code does; the paper's text says frozen)."""
    train: TrainConfig
    released_code: ReleasedCodeSwitches = ReleasedCodeSwitches()

    @field_validator("gate_averages")
    @classmethod
    def _averages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(
                f"`fusion.gate_averages` must list distinct averages from sequence, prompt; got {list(v)}"
            )
        return v

    @field_validator("drift_gammas")
    @classmethod
    def _gammas(cls, v: dict[str, float]) -> dict[str, float]:
        negative = {k: g for k, g in v.items() if g < 0}
        if negative:
            raise ValueError(f"negative loss weight(s) {negative} in `fusion.drift_gammas`; use values >= 0")
        return v

    def gamma(self, expert: str) -> float:
        return self.drift_gammas.get(expert, 0.0)

    @property
    def variant(self) -> str:
        """Name of the trained model's folder, after lambda, gamma and k (and the released code's switches that
        are on, e.g. ``_rc-lab-gl-att``)."""
        extra = sorted(e for e in self.drift_gammas if e not in TASKS)  # experts not named after a dimension
        gammas = "-".join(f"{self.gamma(t):g}" for t in (*TASKS, *extra))
        return f"lam{self.gate_weight:g}_gam{gammas}_k{self.top_k}{self.released_code_suffix()}"

    def released_code_suffix(self, names: tuple[str, ...] | None = None) -> str:
        """``_rc-<codes>`` of the released code's switches that are on (among `names`), or ``""``."""
        rc = self.released_code
        codes = [rc.CODES[k] for k in rc.on(names)]
        if self.attention_lora and names is None:
            codes.append("att")
        return f"_rc-{'-'.join(codes)}" if codes else ""

    def hash_payload(self) -> dict[str, Any]:
        """The section as the artifacts' hashes see it (`ReleasedCodeSwitches.hash_payload`)."""
        dump = self.model_dump(mode="json")
        dump["released_code"] = self.released_code.hash_payload()
        return dump
