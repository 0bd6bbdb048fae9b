"""The paper's train and evaluation splits of the three tasks (data/README.md), from local files or the hub.

- helpful: train = Alpaca (records with an empty output are skipped); eval = the 805 AlpacaEval instructions
  with the text-davinci-003 output as reference (the paper scores the first 50).
- harmless: train = `is_safe` rows of BeaverTails 30k_train; eval = 30k_test prompts. When only 30k_test
  exists (the offline copy), it is split BY PROMPT into "eval" and "non_eval" prompts (seeded), so no prompt
  is in both; train = `is_safe` rows of non_eval, and the harmlessness judge trains on non_eval rows.
- honest: TruthfulQA generation, first half (408 questions) for training with one example per correct
  answer, last half (409) for evaluation with the best answer and the MC1/MC2 targets of mc_task.json.

Training examples are capped at `profile.data.train_examples[task]` by a seeded sample (source order kept).
Evaluation items are a seeded sample stratified by each source's own strata (AlpacaEval subset, BeaverTails
harm category, TruthfulQA category; `stratified_order`), never the first N of a file: TruthfulQA's file is
grouped by category. `data.eval_sample: first` keeps the paper's "first N" rule (the `paper` profile's 50
AlpacaEval instructions).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from h3fusion.config import TASKS, Profile, shown_path
from h3fusion.data import sources
from h3fusion.errors import DataError

log = logging.getLogger(__name__)
_said: set[str] = set()


def say_once(message: str) -> None:
    """Warn about a data deviation once per process (loaders run in every stage)."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


@dataclass(frozen=True)
class TrainExample:
    """One supervised example: the prompt is built from instruction (+ input), the loss is on `output`."""

    task: str
    instruction: str
    input: str
    output: str


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {list(TASKS)}")


# ---------------------------------------------------------------------------------------------- helpful


def helpful_train_all(profile: Profile) -> tuple[list[TrainExample], int]:
    """All usable Alpaca examples and the number skipped for an empty output."""
    records = sources.load_records(profile, "alpaca")
    examples = [
        TrainExample("helpful", r["instruction"], r["input"], r["output"])
        for r in records
        if r["output"].strip()
    ]
    skipped = len(records) - len(examples)
    if skipped:
        say_once(f"Alpaca: skipped {skipped} of {len(records)} records with an empty output")
    return examples, skipped


def helpful_eval_all(profile: Profile) -> list[dict[str, Any]]:
    records = sources.load_records(profile, "alpaca_eval")
    return [
        {
            "id": f"alpaca_eval-{i}",
            "instruction": r["instruction"],
            "reference": r["output"],
            "stratum": str(r.get("dataset") or "all"),
        }
        for i, r in enumerate(records)
    ]


# --------------------------------------------------------------------------------------------- harmless


@dataclass
class BeaverSplit:
    """BeaverTails rows per split; `carved` says the split was cut out of 30k_test by prompt."""

    carved: bool
    eval_rows: list[dict[str, Any]]
    non_eval_rows: list[dict[str, Any]]
    eval_prompts: list[str] = field(default_factory=list)
    non_eval_prompts: list[str] = field(default_factory=list)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": r["prompt"],
        "response": r["response"],
        "is_safe": r["is_safe"],
        "category": r["category"],
    }


def distinct_in_order(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def beavertails_split(profile: Profile) -> BeaverSplit:
    """Eval / non_eval rows: 30k_test / 30k_train when 30k_train exists, else 30k_test carved by prompt."""
    test = [_row(r) for r in sources.load_records(profile, "beavertails_test")]
    if sources.available(profile, "beavertails_train"):
        train = [_row(r) for r in sources.load_records(profile, "beavertails_train")]
        return BeaverSplit(
            False,
            test,
            train,
            distinct_in_order([r["prompt"] for r in test]),
            distinct_in_order([r["prompt"] for r in train]),
        )
    prompts = distinct_in_order([r["prompt"] for r in test])
    if len(prompts) < 2:
        raise DataError(
            f"BeaverTails 30k_test has {len(prompts)} distinct prompt(s); at least 2 are needed to split it"
        )
    shuffled = list(prompts)
    random.Random(profile.seed).shuffle(shuffled)
    n_eval = min(max(round(profile.data.beavertails_eval_fraction * len(prompts)), 1), len(prompts) - 1)
    eval_set = set(shuffled[:n_eval])
    split = BeaverSplit(
        True,
        [r for r in test if r["prompt"] in eval_set],
        [r for r in test if r["prompt"] not in eval_set],
        [p for p in prompts if p in eval_set],
        [p for p in prompts if p not in eval_set],
    )
    say_once(
        f"BeaverTails 30k_train is not in {shown_path(profile.data_dir)}: carved 30k_test ({len(test)} rows, {len(prompts)} prompts) "
        f"by prompt (seed {profile.seed}) into eval {len(split.eval_prompts)} prompts / {len(split.eval_rows)} rows and "
        f"non_eval {len(split.non_eval_prompts)} prompts / {len(split.non_eval_rows)} rows"
    )
    return split


def harmless_train_all(profile: Profile) -> tuple[list[TrainExample], int]:
    """Safe (prompt -> response) rows of the non_eval split, and the number of safe rows with an empty response."""
    safe = [r for r in beavertails_split(profile).non_eval_rows if r["is_safe"]]
    examples = [
        TrainExample("harmless", r["prompt"], "", r["response"]) for r in safe if r["response"].strip()
    ]
    skipped = len(safe) - len(examples)
    if skipped:
        say_once(f"BeaverTails: skipped {skipped} safe rows with an empty response")
    return examples, skipped


def load_beavertails_labelled(profile: Profile, split: str) -> list[dict[str, Any]]:
    """All labelled rows {prompt, response, is_safe, category} of `eval` or `non_eval` (judge training/validation)."""
    if split not in ("eval", "non_eval"):
        raise DataError(f"unknown BeaverTails split {split!r}; choose 'eval' or 'non_eval'")
    bt = beavertails_split(profile)
    rows = bt.eval_rows if split == "eval" else bt.non_eval_rows
    return [dict(r) for r in rows]


# ----------------------------------------------------------------------------------------------- honest


def truthfulqa_halves(profile: Profile) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(train rows, eval rows, offset of the eval rows): the released code's unshuffled 50 % split (408 / 409)."""
    rows = sources.load_records(profile, "truthfulqa_generation")
    n_eval = math.ceil(len(rows) / 2)  # datasets.train_test_split(test_size=0.5): test gets the ceiling
    n_train = len(rows) - n_eval
    return rows[:n_train], rows[n_train:], n_train


def honest_train_all(profile: Profile) -> tuple[list[TrainExample], int]:
    """One example per non-empty correct answer of the training questions, and the number of empty answers."""
    train, _, _ = truthfulqa_halves(profile)
    examples, empty = [], 0
    for r in train:
        for answer in r["correct_answers"]:
            if isinstance(answer, str) and answer.strip():
                examples.append(TrainExample("honest", r["question"], "", answer.strip()))
            else:
                empty += 1
    if empty:
        say_once(f"TruthfulQA: skipped {empty} empty correct answers of the training questions")
    return examples, empty


def honest_eval_all(profile: Profile) -> tuple[list[dict[str, Any]], list[str]]:
    """Eval questions with MC1/MC2 targets matched by (stripped) question text, and the unmatched questions."""
    _, rows, offset = truthfulqa_halves(profile)
    mc = {r["question"].strip(): r for r in sources.load_records(profile, "truthfulqa_mc")}
    items, missing = [], []
    for i, r in enumerate(rows):
        match = mc.get(r["question"].strip())
        if match is None:
            missing.append(r["question"])
        items.append(
            {
                "id": f"truthfulqa-{offset + i}",
                "question": r["question"],
                "best_answer": r["best_answer"],
                "correct_answers": [a for a in r["correct_answers"] if a.strip()],
                "incorrect_answers": [a for a in r["incorrect_answers"] if a.strip()],
                "mc1_targets": dict(match["mc1_targets"]) if match else {},
                "mc2_targets": dict(match["mc2_targets"]) if match else {},
                "stratum": str(r.get("category") or "all"),
            }
        )
    if missing:
        say_once(
            f"TruthfulQA: {len(missing)} eval question(s) have no MC1/MC2 targets in mc_task: {missing[:3]}"
        )
    return items, missing


# ----------------------------------------------------------------------------------------------- public


def train_pool(profile: Profile, task: str) -> list[TrainExample]:
    """Every training example of one task's source (its dimension's `train_pool`), before the profile's cap."""
    from h3fusion.dimensions import get_dimension

    _check_task(task)
    return get_dimension(task).train_pool(profile)


def cap(examples: list[Any], n: int, seed: int, task: str) -> list[Any]:
    """A seeded sample of n examples in source order (all of them when n >= len)."""
    if n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_train_examples(profile: Profile, task: str) -> list[TrainExample]:
    """Training examples of one task, capped at `profile.data.train_examples[task]`."""
    examples = train_pool(profile, task)
    return cap(examples, profile.data.train_examples[task], profile.seed, task)


def load_expert_examples(
    profile: Profile, expert: str, pool: list[TrainExample] | None = None
) -> list[TrainExample]:
    """An expert's training examples: its dimension's pool (`pool`, when the caller has it), capped by the expert's
    own sample (its seed and size; for the default experts exactly `load_train_examples` of their dimension)."""
    dimension = profile.expert_spec(expert).dimension
    pool = train_pool(profile, dimension) if pool is None else pool
    return cap(pool, profile.expert_train_examples(expert), profile.expert_seed(expert), dimension)


def load_heldout_examples(profile: Profile, task: str, n: int) -> list[TrainExample]:
    """n examples of a task's *training source* whose prompt no training sample of the profile holds (fusion's,
    and every expert's of that dimension): a seeded sample, one example per prompt (what routing is measured on:
    the distribution the router trained on, items it never saw). Fewer than n when the source has fewer unseen
    prompts."""
    pool = train_pool(profile, task)
    used = cap(pool, profile.data.train_examples[task], profile.seed, task)  # fusion's sample
    for spec in profile.expert_specs:
        if spec.dimension == task:
            used += load_expert_examples(profile, spec.name, pool)
    seen = {(e.instruction, e.input) for e in used}
    unseen: dict[tuple[str, str], TrainExample] = {}
    for e in pool:
        if (e.instruction, e.input) not in seen:
            unseen.setdefault((e.instruction, e.input), e)
    if not unseen:
        raise DataError(
            f"{task}: the training sample uses every prompt of its source, so none is held out; lower "
            f"data.train_examples.{task}"
        )
    candidates = list(unseen.values())
    rng = random.Random(f"{profile.seed}:{task}:heldout")
    return rng.sample(candidates, min(n, len(candidates)))


def stratified_order(items: list[dict[str, Any]], seed: int, task: str) -> list[dict[str, Any]]:
    """`items` in a seeded order whose every prefix is a proportionally stratified sample (by `stratum`).

    Within each stratum the items are shuffled; item j of a stratum of m items gets the key (j + u) / m, with u
    one uniform offset per stratum, and sorting by key interleaves the strata in proportion to their sizes
    (systematic sampling). So the first n items hold about n * m / N of each stratum, and a shorter prefix
    (the ablations' scoring items) is a stratified sample nested in the longer one.
    """
    rng = random.Random(f"{seed}:{task}:eval-sample")
    members: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        members[item["stratum"]].append(i)
    keyed = []
    for stratum in sorted(members):
        indices = members[stratum]
        rng.shuffle(indices)
        offset = rng.random()
        keyed += [((j + offset) / len(indices), rng.random(), i) for j, i in enumerate(indices)]
    return [items[i] for *_, i in sorted(keyed)]


def eval_items_all(profile: Profile, task: str) -> list[dict[str, Any]]:
    """Every evaluation item of one task, in the order samples are drawn from (`data.eval_sample`)."""
    from h3fusion.dimensions import get_dimension

    _check_task(task)
    items = get_dimension(task).eval_pool(profile)
    return stratified_order(items, profile.seed, task) if profile.data.eval_sample == "stratified" else items


def load_eval_items(profile: Profile, task: str) -> list[dict[str, Any]]:
    """The `profile.data.eval_examples[task]` evaluation items of one task: a seeded stratified sample (or the
    first N with `data.eval_sample: first`); keys: see data/README.md, `stratum` included."""
    return eval_items_all(profile, task)[: profile.data.eval_examples[task]]


def xstest_eval_items(profile: Profile) -> list[dict[str, str]]:
    """The XSTest prompts every model answers for its over-refusal rates: `evaluation.xstest_per_type` prompts of
    each type (a seeded sample, `cap`; all 450 when null), in file order. The same count per type, so that no kind
    of safe prompt or unsafe contrast dominates a rate; never the first N of a type."""
    from h3fusion.evaluation.judges.refusal import load_prompts

    n = profile.evaluation.xstest_per_type
    rows = load_prompts(profile)
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_type[r["type"]].append(i)
    smallest = min(by_type, key=lambda t: len(by_type[t]))
    if n is not None and n > len(by_type[smallest]):
        raise DataError(
            f"evaluation.xstest_per_type is {n} but XSTest's type {smallest!r} has {len(by_type[smallest])} "
            f"prompts; use at most {len(by_type[smallest])}, or null for all {len(rows)} prompts"
        )
    keep = [
        i
        for t, members in by_type.items()
        for i in (members if n is None else cap(members, n, profile.seed, f"xstest-{t}"))
    ]
    return [rows[i] for i in sorted(keep)]


def harmless_eval_all(profile: Profile) -> list[dict[str, Any]]:
    """Distinct eval prompts in file order; the id is the prompt's position among all distinct 30k_test prompts."""
    bt = beavertails_split(profile)
    all_test = distinct_in_order([r["prompt"] for r in sources.load_records(profile, "beavertails_test")])
    position = {p: i for i, p in enumerate(all_test)}
    flagged: dict[str, Counter[str]] = defaultdict(Counter)
    for r in bt.eval_rows:
        flagged[r["prompt"]].update(k for k, v in r["category"].items() if v)
    return [
        {"id": f"beavertails-{position[p]}", "prompt": p, "stratum": _harm_category(flagged[p])}
        for p in bt.eval_prompts
    ]


def _harm_category(counts: Counter[str]) -> str:
    """A prompt's stratum: the harm category its labelled responses are flagged with most often (ties by name)."""
    if not counts:
        return "none flagged"
    return min(counts, key=lambda k: (-counts[k], k))


def _preference(value: Any, index: int, origin: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"malformed record {index} in {origin}: field 'preference' is {value!r}, not a number"
        ) from None


def load_alpaca_eval_annotations(profile: Profile) -> list[dict[str, Any]]:
    """GPT-4 pairwise verdicts of AlpacaEval 1 (8 models x 805): preference 1 = output_1 (text-davinci-003)
    wins, 2 = output_2 (the model) wins, 0 = tie, None = no verdict. `index` is the AlpacaEval item index."""
    out = []
    folder = profile.data_dir / sources.ANNOTATIONS_DIR
    for model, records in sources.load_annotation_files(profile).items():
        for i, r in enumerate(records):
            out.append(
                {
                    "model": model,
                    "index": i,
                    "instruction": r["instruction"],
                    "output_1": r["output_1"],
                    "output_2": r["output_2"],
                    "generator_1": r.get("generator_1"),
                    "generator_2": r.get("generator_2", model),
                    "dataset": r.get("dataset"),
                    "preference": _preference(r["preference"], i, str(folder / f"{model}.json")),
                }
            )
    return out
