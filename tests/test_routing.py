"""Routing on held-out training-source items: the three token masks, accuracies with intervals, references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from h3fusion import routing
from h3fusion.config import load_profile
from h3fusion.data import TrainExample, format_prompt, tokenize_example
from h3fusion.errors import H3FusionError
from h3fusion.models import load_tokenizer
from tests.helpers import random_upcycled_moe

TASKS = ("helpful", "harmless", "honest")


@pytest.fixture(scope="module")
def profile():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def tokenizer(profile):
    return load_tokenizer(profile)


def test_template_length_covers_the_shared_header_and_stops_at_the_instruction(tokenizer):
    headers = routing.template_header_ids(tokenizer)
    for instruction, inp in [("Name a colour.", ""), ("Translate this.", "Bonjour"), ("Why?", "")]:
        ids = tokenizer(format_prompt(instruction, inp))["input_ids"]
        n = int(routing.template_lengths(torch.tensor([ids]), headers)[0])
        head = tokenizer.decode(ids[:n])
        assert head.startswith("Below is an instruction") and "Instruction:" in head
        assert instruction.split()[0] not in head
        assert instruction.split()[0] in tokenizer.decode(ids[n:])
    # rows of a batch get their own lengths; a row without the template gets 0
    other = tokenizer("Hello there, no template here at all.")["input_ids"]
    ids = tokenizer(format_prompt("Why?"))["input_ids"]
    width = max(len(other), len(ids))
    batch = torch.tensor([ids + [0] * (width - len(ids)), other + [0] * (width - len(other))])
    lengths = routing.template_lengths(batch, headers)
    assert lengths[0] > 10 and lengths[1] == 0


def test_masks_of_a_tokenised_pair(tokenizer, profile):
    headers = routing.template_header_ids(tokenizer)
    example = TrainExample("helpful", "Name a colour.", "", "Blue.")
    enc = tokenize_example(tokenizer, example, profile.data.max_length)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor([enc["labels"]])
    mask = torch.ones_like(ids)
    template = routing.template_lengths(ids, headers)
    n = int(template[0])
    masks = routing.routing_masks(mask, labels, template)
    assert masks["sequence"].sum() == ids.shape[1]
    n_prompt = int((labels == -100).sum())
    assert masks["prompt"].sum() == n_prompt and masks["prompt"][0, :n_prompt].all()
    after = masks["sequence after template"]
    assert after.sum() == ids.shape[1] - n and not after[0, :n].any()
    prompt_after = masks["prompt after template"]
    assert prompt_after.sum() == n_prompt - n and prompt_after[0, n:n_prompt].all()


def test_accuracy_rows_count_the_own_expert_with_wilson_intervals():
    top = {"helpful": np.array([0, 0, 1, 0]), "harmless": np.array([1, 1]), "honest": np.array([0, 2])}
    rows = {r["task"]: r for r in routing.accuracy_rows(top, TASKS)}
    assert rows["helpful"]["accuracy %"] == 75.0 and rows["harmless"]["accuracy %"] == 100.0
    assert rows["all"]["n"] == 8 and rows["all"]["correct"] == 6
    assert rows["helpful"]["low"] < 75.0 < rows["helpful"]["high"] <= 100.0
    assert rows["harmless"]["high"] == pytest.approx(100.0)
    with pytest.raises(H3FusionError, match="no expert"):
        routing.accuracy_rows({"other": np.array([0])}, TASKS)


def test_reference_routers_floor():
    refs = routing.reference_routers({t: 3000 for t in TASKS}, 3, seed=0)
    const = {r["task"]: r for r in routing.accuracy_rows(refs["constant router (expert 0)"], TASKS)}
    assert const["helpful"]["accuracy %"] == 100.0 and const["honest"]["accuracy %"] == 0.0
    assert const["all"]["accuracy %"] == pytest.approx(100 / 3)
    rand = {r["task"]: r for r in routing.accuracy_rows(refs["random router"], TASKS)}
    assert rand["all"]["low"] < 100 / 3 < rand["all"]["high"]


def test_heldout_routing_of_an_moe_rows_sum_to_one_and_table_reads_them(profile, tokenizer):
    moe = random_upcycled_moe(profile, len(tokenizer))
    per = routing.heldout_routing(moe, tokenizer, profile, n=5, batch_size=2)
    assert set(per) == set(profile.tasks)
    for by_mask in per.values():
        assert set(by_mask) == set(routing.MASKS)
        for arr in by_mask.values():
            assert arr.shape[0] == 5 and arr.shape[2] == 3
            np.testing.assert_allclose(arr.sum(axis=-1), 1.0, rtol=1e-5)
        # the masks differ: the prompt alone is not the whole sequence
        assert not np.allclose(by_mask["prompt"], by_mask["sequence"])
    # a batch size does not change a result
    again = routing.heldout_routing(moe, tokenizer, profile, n=5, batch_size=5)
    for task in per:
        np.testing.assert_allclose(again[task]["prompt"], per[task]["prompt"], atol=1e-5)
    table = routing.routing_table({"moe": per}, profile.tasks)
    assert set(table.index.get_level_values("model")) == {
        "moe",
        "constant router (expert 0)",
        "random router",
    }
    summary = routing.accuracy_summary(table, "moe", "prompt")
    assert set(summary) == {*profile.tasks, "all"}
