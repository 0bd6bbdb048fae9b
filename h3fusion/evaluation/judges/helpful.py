"""Helpfulness: P(answer beats the text-davinci-003 reference), as AlpacaEval 1's GPT-4 judge would say.

The offline judge is a gradient-boosted tree model on pairwise features (length, structure, refusal markers,
lexical relevance to the instruction, overlap with the reference) fitted to the 8 x 805 GPT-4 verdicts of
AlpacaEval 1. It trains only on instructions disjoint from the ones the profile scores and from a further
held-out set on which it is validated against GPT-4 and against the "longer answer wins" rule (GPT-4 favours
longer answers, so a judge must beat that rule to be more than a length meter). Ties (preference 0 or 1.5)
and missing verdicts are left out of training and validation. Tried and dropped (grouped cross-validation on
training instructions only): MiniLM sentence-embedding features (cosine similarities, answer-reference embedding
differences) did not improve accuracy and cost minutes of CPU encoding; a logistic regression on the same
features scored about 3 points below the boosted trees; training on both answer orders did not help.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.artifacts import atomic_write_json
from h3fusion.config import Profile
from h3fusion.errors import ArtifactError, DataError, H3FusionError
from h3fusion.evaluation.judges.common import JUDGE_CODE_VERSION, binary_metrics, cached_judge, read_json

_WORD = re.compile(r"[a-z0-9']+")
_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[-*\u2022])", re.M)
_REFUSAL = re.compile(
    r"(?i)as an ai|i'm sorry|i am sorry|i cannot|i can't|i apologi[sz]e|language model|i do not have|i don't have"
)
CLOSE_LENGTH = 0.2
"""Pairs whose two answers differ in length by less than this share are the 'close length' subset."""

FEATURES = (
    "d_log_chars",
    "d_log_words",
    "d_lines",
    "d_list_items",
    "d_refusal",
    "d_empty",
    "log_chars",
    "log_words",
    "lines",
    "list_items",
    "refusal",
    "empty",
    "d_instruction_recall",
    "instruction_recall",
    "reference_jaccard",
    "d_type_token",
    "type_token",
    "log_instruction_words",
)


def _surface(text: str) -> list[float]:
    words = text.split()
    return [
        float(np.log1p(len(text))),
        float(np.log1p(len(words))),
        float(text.count("\n")),
        float(len(_LIST_ITEM.findall(text))),
        float(bool(_REFUSAL.search(text))),
        float(not text.strip()),
    ]


def _tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _type_token(text: str) -> float:
    words = text.split()
    return len(set(words)) / max(len(words), 1)


def pair_features(instruction: str, answer: str, reference: str) -> list[float]:
    """Features of (answer vs reference) for one instruction; see FEATURES for the names."""
    answer, reference = answer or "", reference or ""
    a, r = _surface(answer), _surface(reference)
    ins, ta, tr = _tokens(instruction), _tokens(answer), _tokens(reference)
    recall_a = len(ins & ta) / max(len(ins), 1)
    recall_r = len(ins & tr) / max(len(ins), 1)
    return [
        *(x - y for x, y in zip(a, r, strict=True)),
        *a,
        recall_a - recall_r,
        recall_a,
        len(ta & tr) / max(len(ta | tr), 1),
        _type_token(answer) - _type_token(reference),
        _type_token(answer),
        float(np.log1p(len(ins))),
    ]


def _is_tie(preference: float | None) -> bool:
    return preference not in (1.0, 2.0)


def split_instructions(profile: Profile, n_items: int) -> dict[str, list[int]]:
    """AlpacaEval item indices: scored (the evaluation sample), held-out validation, training; disjoint."""
    from h3fusion.data import load_eval_items

    scored = sorted(int(it["id"].rsplit("-", 1)[1]) for it in load_eval_items(profile, "helpful"))
    scored = [i for i in scored if i < n_items]
    n_scored = len(scored)
    taken = set(scored)
    rest = [i for i in range(n_items) if i not in taken]
    random.Random(f"{profile.seed}:helpful-judge").shuffle(rest)
    n_val = min(profile.judges.helpful.validation_instructions, len(rest) // 2)
    if n_val < 1 or len(rest) - n_val < 1:
        raise DataError(
            f"only {len(rest)} AlpacaEval instructions are left after the {n_scored} scored ones: too few to train and "
            "validate the helpfulness judge; lower data.eval_examples.helpful"
        )
    return {
        "scored": scored,
        "validation": sorted(rest[:n_val]),
        "train": sorted(rest[n_val:]),
    }


GBT_PARAMS = {"max_iter": 150, "learning_rate": 0.05, "max_depth": 3}
"""Chosen by 5-fold cross-validation grouped by instruction on the training instructions only (accuracy 0.78
vs 0.75 for a logistic regression and 0.74 for the longer-answer rule on the same folds)."""


def fit_model(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(**GBT_PARAMS, random_state=seed).fit(x, y)


TRAIN_DATA = "train.npz"
"""The cached judge is its training pairs (plain arrays, no pickle: a cache from elsewhere runs no code); the
boosted trees are refitted from them on load, deterministically (same data, same seed, same trees)."""
STORAGE_FORMAT = "refit-npz-1"


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def save_training_data(x: np.ndarray, y: np.ndarray, path: Path) -> str:
    """Write the training pairs as a plain .npz (atomically); returns their digest for features.json."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x=np.ascontiguousarray(x, dtype=np.float64), y=np.ascontiguousarray(y, dtype=np.int64))
    tmp.replace(path)
    return _digest(x.astype(np.float64), y.astype(np.int64))


def load_training_data(path: Path, digest: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The cached training pairs, refused unless they are plain numeric arrays of the right shape and digest."""
    refuse = f"delete {path.parent} to rebuild it"
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != {"x", "y"}:
                raise ValueError(f"arrays {sorted(data.files)} instead of x and y")
            x, y = data["x"], data["y"]
    except (OSError, ValueError, EOFError) as exc:
        raise ArtifactError(
            f"{path} is not a helpfulness judge written by h3fusion ({exc}); it was not loaded: {refuse}"
        ) from None
    if (
        x.dtype != np.float64
        or y.dtype != np.int64
        or x.ndim != 2
        or x.shape[1] != len(FEATURES)
        or y.shape != (len(x),)
    ):
        raise ArtifactError(
            f"{path} holds arrays of another shape or type than the judge's training pairs: {refuse}"
        )
    if _digest(x, y) != digest:
        raise ArtifactError(
            f"{path} does not match the digest in features.json (changed or damaged): {refuse}"
        )
    return x, y


def _pairs(annotations: list[dict[str, Any]], items: set[int]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rows = [a for a in annotations if a["index"] in items and not _is_tie(a["preference"])]
    x = np.array(
        [pair_features(a["instruction"], a["output_2"], a["output_1"]) for a in rows], dtype=np.float64
    )
    y = np.array([int(a["preference"] == 2.0) for a in rows])
    return x.reshape(len(rows), len(FEATURES)), y, rows


def validate(model: Any, annotations: list[dict[str, Any]], items: set[int]) -> dict[str, Any]:
    """Agreement with GPT-4 on held-out non-tie verdicts, next to the longer-answer rule on the same pairs."""
    x, y, rows = _pairs(annotations, items)
    pred = (model.predict_proba(x)[:, 1] > 0.5).astype(int)
    len_a = np.array([len(r["output_2"] or "") for r in rows])
    len_r = np.array([len(r["output_1"] or "") for r in rows])
    longer = (len_a > len_r).astype(int)
    close = np.abs(len_a - len_r) / np.maximum(np.maximum(len_a, len_r), 1) < CLOSE_LENGTH
    judge, rule = binary_metrics(y, pred), binary_metrics(y, longer)
    return {
        "heldout_instructions": len(items),
        "heldout_pairs": len(rows),
        "ties": "pairs with a GPT-4 tie (0 or 1.5) or no verdict are excluded from training and validation",
        "accuracy": judge["accuracy"],
        "cohen_kappa": judge["cohen_kappa"],
        "longer_answer_rule_accuracy": rule["accuracy"],
        "longer_answer_rule_kappa": rule["cohen_kappa"],
        "close_length_pairs": int(close.sum()),
        "close_length_accuracy": binary_metrics(y[close], pred[close])["accuracy"]
        if close.any()
        else float("nan"),
        "close_length_rule_accuracy": binary_metrics(y[close], longer[close])["accuracy"]
        if close.any()
        else float("nan"),
        "model_win_rate_gpt4": round(float(y.mean()), 4),
    }


def validate_at_cap(
    model: Any, annotations: list[dict[str, Any]], items: set[int], cut: Any, cap: int
) -> dict[str, Any]:
    """The judge where it is used: held-out pairs whose candidate answer is cut to the generation cap (`cut`:
    text -> its first `cap` tokens), scored against GPT-4's verdicts on the WHOLE answers (the models here answer
    in at most `cap` new tokens). Per generator, the judge's win rate next to GPT-4's, and how well each ranks
    the 8 generators (Spearman's rho; 1 = GPT-4's order)."""
    from scipy.stats import spearmanr

    x, y, rows = _pairs(annotations, items)
    cut_rows = [{**r, "output_2": cut(r["output_2"] or "")} for r in rows]
    x_cut = np.array(
        [pair_features(r["instruction"], r["output_2"], r["output_1"]) for r in cut_rows], dtype=np.float64
    ).reshape(len(rows), len(FEATURES))
    full, at_cap = model.predict_proba(x)[:, 1] > 0.5, model.predict_proba(x_cut)[:, 1] > 0.5
    generators = sorted({r["model"] for r in rows})
    per = {
        g: (
            float(y[m].mean()),
            float(full[m].mean()),
            float(at_cap[m].mean()),
        )
        for g in generators
        for m in [np.array([r["model"] == g for r in rows])]
    }
    gpt4, judge_full, judge_cap = (np.array([per[g][i] for g in generators]) for i in range(3))
    return {
        "cap_tokens": cap,
        "accuracy_vs_gpt4_whole_answers": binary_metrics(y, at_cap.astype(int))["accuracy"],
        "gpt4_win_rate_range": [round(float(gpt4.min()), 3), round(float(gpt4.max()), 3)],
        "judge_win_rate_range_whole": [round(float(judge_full.min()), 3), round(float(judge_full.max()), 3)],
        "judge_win_rate_range_at_cap": [round(float(judge_cap.min()), 3), round(float(judge_cap.max()), 3)],
        "generator_rank_rho_whole": round(float(spearmanr(gpt4, judge_full).statistic), 3),
        "generator_rank_rho_at_cap": round(float(spearmanr(gpt4, judge_cap).statistic), 3),
        "generators": len(generators),
    }


def describe_at_cap(validation: dict[str, Any]) -> str:
    """`validate_at_cap`'s figures as two sentences a reader can act on."""
    cap = validation.get("at_generation_cap")
    if not cap:
        return "This judge was not validated at the generation cap (a judge other than the offline one)."
    lo, hi = cap["gpt4_win_rate_range"]
    jl, jh = cap["judge_win_rate_range_at_cap"]
    return (
        f"With candidate answers cut to {cap['cap_tokens']} tokens, the judge agrees with GPT-4's verdicts on the "
        f"whole answers on {100 * cap['accuracy_vs_gpt4_whole_answers']:.1f} % of held-out pairs (whole answers: "
        f"{100 * validation['accuracy']:.1f} %; the longer-answer rule: {100 * validation['longer_answer_rule_accuracy']:.1f} %). "
        f"Across the {cap['generators']} AlpacaEval generators its win rates span {100 * jl:.0f}-{100 * jh:.0f} % "
        f"where GPT-4's span {100 * lo:.0f}-{100 * hi:.0f} %, and it orders the generators with Spearman's rho "
        f"{cap['generator_rank_rho_at_cap']:.2f} (whole answers: {cap['generator_rank_rho_whole']:.2f}). "
        "A win rate below is comparable between models of this book, answered under the same cap; as an absolute "
        "AlpacaEval figure it is only as good as this agreement."
    )


class OfflinePairwiseJudge:
    """Pairwise helpfulness judge fitted to AlpacaEval 1's GPT-4 verdicts (a proxy, not GPT-4)."""

    name = "offline pairwise (proxy for GPT-4)"

    def __init__(self, model: Any, validation: dict[str, Any]) -> None:
        self.model = model
        self.validation = validation

    def win_probability(
        self, instructions: Sequence[str], answers: Sequence[str], references: Sequence[str]
    ) -> np.ndarray:
        """P(answer beats reference) per item."""
        if not len(instructions) == len(answers) == len(references):
            raise H3FusionError(
                f"win_probability needs one instruction, answer and reference per item, got "
                f"{len(instructions)}, {len(answers)}, {len(references)}"
            )
        if not instructions:
            return np.zeros(0)
        x = np.array(
            [pair_features(i, a, r) for i, a, r in zip(instructions, answers, references, strict=True)]
        )
        return self.model.predict_proba(x.reshape(len(instructions), len(FEATURES)))[:, 1]


def config_hash(profile: Profile) -> str:
    payload = {
        "v": JUDGE_CODE_VERSION,
        "params": GBT_PARAMS,
        "seed": profile.seed,
        "scored": profile.data.eval_examples["helpful"],
        "eval_sample": profile.data.eval_sample,
        "val": profile.judges.helpful.validation_instructions,
        "data": str(profile.data_dir),
        "source": profile.data.source,
        "storage": STORAGE_FORMAT,
        "cap": profile.evaluation.generation_for("helpful").max_new_tokens,
        "tokenizer": profile.model.base,
    }
    from h3fusion.artifacts import digest

    return digest(payload)


def _token_cut(profile: Profile, cap: int) -> Any:
    """text -> its first `cap` tokens of the profile's tokenizer (how long the evaluated models' answers can be)."""
    from h3fusion.models import load_tokenizer

    tok = load_tokenizer(profile)

    def cut(text: str) -> str:
        ids = tok(text, add_special_tokens=False).input_ids
        return text if len(ids) <= cap else tok.decode(ids[:cap], skip_special_tokens=True)

    return cut


def load_offline(profile: Profile) -> OfflinePairwiseJudge:
    """The offline pairwise judge, refitted from its cached training pairs (built first when missing)."""
    cap = profile.evaluation.generation_for("helpful").max_new_tokens

    def build(folder: Path) -> dict[str, Any]:
        from h3fusion.data import load_alpaca_eval_annotations

        annotations = load_alpaca_eval_annotations(profile)
        n_items = max(a["index"] for a in annotations) + 1
        split = split_instructions(profile, n_items)
        x, y, _ = _pairs(annotations, set(split["train"]))
        model = fit_model(x, y, profile.seed)
        validation = validate(model, annotations, set(split["validation"]))
        validation["at_generation_cap"] = validate_at_cap(
            model, annotations, set(split["validation"]), _token_cut(profile, cap), cap
        )
        validation["train_instructions"] = len(split["train"])
        validation["train_pairs"] = len(y)
        validation["scored_instructions_excluded"] = len(split["scored"])
        digest = save_training_data(x, y, folder / TRAIN_DATA)
        atomic_write_json(
            folder / "features.json", {"features": FEATURES, "params": GBT_PARAMS, "train_sha256": digest}
        )
        atomic_write_json(folder / "split.json", split)
        return validation

    folder, manifest = cached_judge(profile, "helpful", config_hash(profile), build)
    stored = read_json(folder / "features.json")
    if tuple(stored.get("features", ())) != FEATURES:
        raise H3FusionError(
            f"cached helpfulness judge {folder} has other features; delete the folder to rebuild it"
        )
    x, y = load_training_data(folder / TRAIN_DATA, stored.get("train_sha256"))
    judge = OfflinePairwiseJudge(fit_model(x, y, profile.seed), dict(manifest.get("validation", {})))
    judge.train_wall_time_s = manifest.get("wall_time_s")
    return judge
