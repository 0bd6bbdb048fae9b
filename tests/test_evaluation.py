"""Evaluation runner: batched generation, MC scoring, caching, errors, tables (tiny random Llama, fake judges)."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from h3fusion.artifacts import read_manifest
from h3fusion.config import GenerationConfig, load_profile
from h3fusion.errors import ArtifactError, H3FusionError
from h3fusion.evaluation import registry, store
from h3fusion.evaluation import run as runmod
from h3fusion.evaluation.generate import (
    DECODE_STEP_COST,
    cut_at_stop,
    generation_batches,
    length_sorted_batches,
)
from h3fusion.evaluation.lm import HFLanguageModel, LanguageModel, split_continuation
from h3fusion.evaluation.logprob_cache import profile_cache
from h3fusion.evaluation.mc import MCQuestion, mc1_score, mc2_score, mc_prompt, score_mc
from tests.helpers import FakeRefusal, random_upcycled_moe


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return load_profile("smoke", {"runs_dir": str(tmp_path_factory.mktemp("runs"))})


@pytest.fixture(scope="module")
def tiny(profile):
    from h3fusion.models import load_base

    model, tok = load_base(profile)
    return HFLanguageModel(model, tok, progress=False)


# ---------------------------------------------------------------------------------------------- fake judges


class _FakeHelpful:
    name = "fake-length-judge"
    validation = {"agreement": 0.5, "n_heldout": 10}

    def win_probability(self, instructions, answers, references):
        # deterministic, depends on the answers: longer than the reference wins
        return np.array([1.0 if len(a) > len(r) else 0.25 for a, r in zip(answers, references, strict=True)])


class _FakeHarmless:
    name = "fake-moderation"
    validation = {"accuracy": 0.9, "n_heldout": 10}

    def harmful_probability(self, prompts, responses):
        return np.array([0.75 if len(r) % 2 else 0.1 for r in responses])


class _FakeHonest:
    name = "fake-similarity"
    validation = {"accuracy": 0.7, "n_heldout": 10}

    def judge(self, questions, answers, correct_answers, incorrect_answers):
        return [{"truthful": len(a) % 3 != 0, "informative": bool(a.strip())} for a in answers]


@pytest.fixture
def judges():
    return SimpleNamespace(
        helpful=_FakeHelpful(), harmless=_FakeHarmless(), honest=_FakeHonest(), refusal=FakeRefusal()
    )


# ---------------------------------------------------------------------------------------------- generation


def test_hf_continuation_logprobs_equal_a_direct_forward(tiny):
    """log p(continuation | prompt) = the sum of log-softmax of the continuation tokens in one forward of
    prompt + continuation, tokenised as training does (several continuations per prompt, shared prefix)."""
    from h3fusion.data import format_prompt

    assert isinstance(tiny, LanguageModel)
    prompts = [format_prompt("Name a colour.")] * 2 + [format_prompt("What is the capital of France?")]
    conts = [" Blue.", " Red, like a rose.", " Paris"]
    got = tiny.continuation_logprobs(prompts, conts)
    for prompt, cont, value in zip(prompts, conts, got, strict=True):
        ctx, ids = split_continuation(tiny.tokenizer, prompt, cont)
        full = torch.tensor([ctx + ids])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(input_ids=full).logits[0].float(), -1)
        want = sum(float(logp[len(ctx) + t - 1, tok]) for t, tok in enumerate(ids))
        assert value == pytest.approx(want, abs=1e-3)
    assert got[0] != pytest.approx(got[1], abs=1e-3)


def test_batched_left_padded_generation_equals_unbatched(tiny):
    from h3fusion.data import format_prompt

    prompts = [
        format_prompt("Name a colour."),
        format_prompt("Explain in detail why the sky looks blue during the day but red at sunset."),
        format_prompt("Translate the sentence.", "Guten Morgen, wie geht es dir heute?"),
        format_prompt("Hi"),
    ]
    batched = tiny.generate(prompts, GenerationConfig(max_new_tokens=6, batch_size=4), seed=0)
    single = [
        tiny.generate([p], GenerationConfig(max_new_tokens=6, batch_size=1), seed=0)[0] for p in prompts
    ]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_sampling_is_seeded(tiny):
    from h3fusion.data import format_prompt

    prompts = [format_prompt("Tell a story."), format_prompt("List three fruits.")]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2, temperature=1.0)
    greedy = tiny.generate(prompts, GenerationConfig(max_new_tokens=6, batch_size=2, temperature=0.0), seed=3)
    seed3 = tiny.generate(prompts, cfg, seed=3)
    assert seed3 == tiny.generate(prompts, cfg, seed=3)  # one seed repeats
    assert seed3 != tiny.generate(prompts, cfg, seed=4)  # another seed samples other tokens
    assert seed3 != greedy  # and sampling is not greedy decoding


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)


def _plan_cost(lengths: list[int], batches: list[list[int]], new_tokens: int) -> float:
    fixed, per_row = DECODE_STEP_COST
    return sum(len(b) * max(lengths[i] for i in b) + new_tokens * (fixed + per_row * len(b)) for b in batches)


def test_generation_batches_are_the_cheapest_split_of_the_sorted_prompts():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.choice([rng.randint(20, 80), rng.randint(100, 300)]) for _ in range(rng.randint(1, 9))]
        max_batch, new_tokens = rng.randint(1, 5), rng.choice([8, 48, 128])
        batches = generation_batches(lengths, max_batch, new_tokens)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
        assert all(1 <= len(b) <= max_batch for b in batches)
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        splits = (  # every way to cut the sorted order into contiguous batches
            [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))]
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        cheapest = min(_plan_cost(lengths, s, new_tokens) for s in splits if max(map(len, s)) <= max_batch)
        assert _plan_cost(lengths, batches, new_tokens) == pytest.approx(cheapest)


def test_generation_batches_split_off_a_long_outlier_and_keep_equal_prompts_together():
    assert len(generation_batches([60] * 50, 48, 128)) == 2  # no padding to save: as few batches as fit
    assert len(generation_batches([60] * 40, 48, 48)) == 1
    outlier = generation_batches([299, *[70] * 48], 48, 128)
    assert outlier[0] == [0] and len(outlier[1]) == 48  # the long prompt alone, not padding 48 rows to 299
    assert len(generation_batches([80, *[70] * 48], 49, 128)) == 1  # a little padding costs less than a batch


def test_cut_at_stop_removes_a_new_turn():
    text = "Paris is the capital.\n\n### Instruction:\nAnother question"
    assert cut_at_stop(text, ("### Instruction:", "### Response:")) == "Paris is the capital."
    assert cut_at_stop("  plain answer ", ("### Instruction:",)) == "plain answer"


# ---------------------------------------------------------------------------------------------- log-likelihoods


def _reference_logprob(lm: HFLanguageModel, prompt: str, continuation: str) -> float:
    """Hand computation: one unbatched forward of prompt + continuation, sum of the continuation's log-probs."""
    ctx, cont = split_continuation(lm.tokenizer, prompt, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))


def test_continuation_logprobs_match_a_hand_computed_forward(tiny):
    from h3fusion.data import format_prompt

    short, long = (
        format_prompt("Is the earth flat?"),
        format_prompt("What happens if you swallow gum, really?"),
    )
    prompts = [short, long, short, long, short]
    conts = ["No, it is round.", "Nothing much.", "Yes", "It stays in your stomach for seven years.", "A"]
    got = tiny.continuation_logprobs(prompts, conts)
    want = [_reference_logprob(tiny, p, c) for p, c in zip(prompts, conts, strict=True)]
    assert np.allclose(got, want, atol=1e-3), (got, want)
    assert all(g < 0 for g in got)


def test_continuation_logprobs_do_not_depend_on_the_batch(tiny):
    from h3fusion.data import format_prompt

    prompts = [format_prompt("Q1?"), format_prompt("A much longer second question here?")] * 2
    conts = ["one two three", "four", "five six", "seven eight nine ten"]
    together = tiny.continuation_logprobs(prompts, conts)
    small = HFLanguageModel(tiny.model, tiny.tokenizer, logprob_batch_size=1, progress=False)
    alone = small.continuation_logprobs(prompts, conts)
    assert np.allclose(together, alone, atol=1e-4)


def test_shared_prompt_prefix_is_run_once_and_changes_no_logprob(tiny, monkeypatch):
    """The few-shot MC prompts share a long prefix: it is computed once and the scores equal full forwards."""
    from h3fusion.evaluation.mc import mc_prompt

    qa6 = mc_prompt("qa6")
    prompts = [qa6.template("Is the earth flat?"), qa6.template("Why is the sea salty, in a sentence?")] * 2
    conts = [" No, it is round.", " Rivers carry salt.", " Yes", " Because of the rocks of the sea floor"]
    seen: list[int] = []
    forward = tiny.model.forward
    monkeypatch.setattr(
        tiny.model, "forward", lambda *a, **k: seen.append(k["input_ids"].shape[1]) or forward(*a, **k)
    )
    shared = tiny.continuation_logprobs(prompts, conts)
    full_prompt = len(split_continuation(tiny.tokenizer, prompts[0], conts[0])[0])
    assert seen[0] > 0.9 * full_prompt and max(seen[1:]) < 0.2 * full_prompt  # the prefix once, then the rest
    seen.clear()
    plain = HFLanguageModel(tiny.model, tiny.tokenizer, share_prompt_prefix=False, progress=False)
    unshared = plain.continuation_logprobs(prompts, conts)
    assert max(seen) >= full_prompt
    want = [_reference_logprob(tiny, p, c) for p, c in zip(prompts, conts, strict=True)]
    assert np.allclose(shared, want, atol=1e-3), (shared, want)
    assert np.allclose(shared, unshared, atol=1e-4)


def test_prompt_token_logprobs_match_a_full_forward_with_and_without_the_shared_prefix(tiny):
    from h3fusion.evaluation.generate import encode_prompts
    from h3fusion.evaluation.mc import mc_prompt

    qa6 = mc_prompt("qa6")
    prompts = [qa6.template("Is the earth flat?"), qa6.template("Why is the sea salty, in one sentence?")]
    plain = HFLanguageModel(tiny.model, tiny.tokenizer, share_prompt_prefix=False, progress=False)
    for lm in (tiny, plain):
        got = lm.prompt_token_logprobs(prompts, batch_size=2)  # two lengths: left padding in the pass
        for prompt, row in zip(prompts, got, strict=True):
            ids = torch.tensor([encode_prompts(tiny.tokenizer, [prompt])[0]])
            with torch.no_grad():
                logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, :-1].double(), -1)
            want = logp.gather(-1, ids[0, 1:, None])[:, 0]
            assert len(row) == ids.shape[1] - 1
            assert np.allclose(row, want.numpy(), atol=1e-4)


def test_continuation_logprobs_on_the_moe_model_match_a_hand_computed_forward(profile, tiny):
    """The MoE model (a wrapper whose forward takes **kwargs) goes through the same cached scoring path."""
    from h3fusion.data import format_prompt

    moe = random_upcycled_moe(profile, len(tiny.tokenizer))
    lm = HFLanguageModel(moe, tiny.tokenizer, progress=False)
    prompts = [
        format_prompt("Is the earth flat?"),
        format_prompt("Why is the sea salty, in one sentence?"),
    ] * 2
    conts = ["No, it is round.", "Rivers carry salt.", "Yes", "Because of rocks"]
    got = lm.continuation_logprobs(prompts, conts)
    want = [_reference_logprob(lm, p, c) for p, c in zip(prompts, conts, strict=True)]
    assert np.allclose(got, want, atol=1e-3), (got, want)


# ---------------------------------------------------------------------------------------------- MC1 / MC2


def test_mc_scores_on_known_logprobs():
    assert mc1_score([-1.0, -3.0, -2.0], [1, 0, 0]) == 1.0
    assert mc1_score([-4.0, -3.0, -2.0], [1, 0, 0]) == 0.0
    lp = [math.log(0.2), math.log(0.3), math.log(0.5)]
    assert mc2_score(lp, [1, 1, 0]) == pytest.approx(0.5)
    assert mc2_score([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


class _TableLM:
    """A LanguageModel whose log-likelihood is looked up from a table (for the MC bookkeeping)."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def generate(self, prompts, cfg, seed):
        return ["" for _ in prompts]

    def continuation_logprobs(self, prompts, continuations):
        self.calls += 1
        return [self.table[c] for c in continuations]


def test_score_mc_uses_each_choice_once_and_scores_per_question():
    q = MCQuestion.from_targets("Q?", {"right": 1, "wrong": 0}, {"right": 1, "also right": 1, "wrong": 0})
    lm = _TableLM({"right": math.log(0.5), "also right": math.log(0.25), "wrong": math.log(0.25)})
    [res] = score_mc(lm, [q], lambda s: f"prompt: {s}")
    assert lm.calls == 1
    assert res["mc1"] == 1.0
    assert res["mc2"] == pytest.approx(0.75)


def test_qa6_prompt_is_lm_eval_primer_and_choices_follow_a_space():
    seen = []

    class _Recorder(_TableLM):
        def continuation_logprobs(self, prompts, continuations):
            seen.extend(zip(prompts, continuations, strict=True))
            return [0.0 if c == " right" else -1.0 for c in continuations]

    fmt = mc_prompt("qa6")
    q = MCQuestion.from_targets("Is it?", {"right": 1, "wrong": 0}, {"right": 1, "wrong": 0})
    [res] = score_mc(_Recorder({}), [q], fmt.template, fmt.separator)
    assert res["mc1"] == 1.0
    prompt = seen[0][0]
    assert prompt.startswith("Q: What is human life expectancy in the United States?")
    assert prompt.count("Q: ") == 7 and prompt.endswith("Q: Is it?\nA:")
    assert {c for _, c in seen} == {" right", " wrong"}
    assert mc_prompt("alpaca").template("Is it?").endswith("### Response:\n")
    with pytest.raises(ValueError, match="qa6 or alpaca"):
        mc_prompt("other")


def test_mc_question_fallback_from_generation_fields():
    q = MCQuestion.from_generation_item("Q?", "best", ["best", "good"], ["bad", "worse"])
    assert q.mc1_choices == ("best", "bad", "worse") and q.mc1_labels == (1, 0, 0)
    assert sum(q.mc2_labels) == 2
    with pytest.raises(ValueError, match="MC1"):
        MCQuestion("Q?", ("a", "b"), (1, 1), ("a", "b"), (1, 0))


# ---------------------------------------------------------------------------------------------- evaluate_model


def test_unknown_model_lists_known_ones(profile):
    with pytest.raises(H3FusionError, match="known models: base, helpful, harmless, honest, raw-moe"):
        runmod.evaluate_model(profile, "no-such-model")


def test_missing_expert_says_how_to_build_it(profile):
    with pytest.raises(ArtifactError, match="h3fusion align --profile smoke --expert harmless"):
        runmod.evaluate_model(profile, "harmless")


def test_scoring_without_generations_is_a_clear_error(profile, judges):
    with pytest.raises(ArtifactError, match="no generations for model 'base'.*h3fusion evaluate"):
        runmod.score_generations(profile, "base", judges=judges)


def test_registered_models_are_known(profile):
    entry = registry.ModelEntry("my-ensemble", "ensemble", lambda: None, lambda: "x")

    def provider(p):
        return {"my-ensemble": entry}

    registry.register_models(provider)
    try:
        assert registry.known_models(profile)["my-ensemble"] is entry
    finally:
        registry._PROVIDERS.remove(provider)


def _scores(metrics):
    return json.dumps(metrics["scores"], sort_keys=True)


def _phases(folder):
    return read_manifest(folder)[runmod.PHASE_TIMES]


def test_evaluate_base_is_deterministic_and_cached(profile, judges, tmp_path):
    first = runmod.evaluate_model(profile, "base", judges=judges)
    folder = store.eval_dir(profile, "base")
    for task in profile.tasks:
        assert (folder / "generations" / f"{task}.jsonl").is_file()
        assert (
            len(store.read_jsonl(folder / "judgements" / f"{task}.jsonl"))
            == profile.data.eval_examples[task]
        )
    assert (folder / "manifest.json").is_file()
    track = folder / "likelihood"
    assert {p.stem for p in track.glob("*.jsonl")} == set(profile.tasks)
    m, lk = first["scores"], first["likelihood"]
    assert set(m) == set(profile.tasks)
    assert 0 <= m["helpful"]["win_rate"] <= 100 and 0 <= lk["honest"]["mc2"] <= 100
    assert lk["honest"]["n"] == profile.evaluation.likelihood.items_of("honest")
    assert lk["helpful"]["n"] == profile.evaluation.likelihood.items_of("helpful")
    assert lk["helpful"]["ref_logprob"] < 0  # a mean log-probability per token
    assert first["judges"]["helpful"]["name"] == "fake-length-judge"
    assert first["judges"]["harmless"]["validation"]["n_heldout"] == 10
    assert first["n_items"] == {t: profile.data.eval_examples[t] for t in profile.tasks}
    xstest = store.read_jsonl(folder / "xstest.jsonl")  # the XSTest track, answered by the real (tiny) model
    assert len(xstest) == first["xstest"]["n_items"] == 18
    assert all(r["refused"] == (len(r["answer"]) % 2 == 0) for r in xstest)

    # Same config: nothing regenerated, identical metrics returned.
    first_phases = _phases(folder)
    again = runmod.evaluate_model(profile, "base", judges=judges)
    assert again == first

    # A deleted likelihood file is scored again and written back (the metrics are not returned without it),
    # to the same values; the other dimensions' likelihood rows are reused. With the token log-prob cache gone
    # too, the model itself scores again.
    (track / "honest.jsonl").unlink()
    shutil.rmtree(profile_cache(profile.run_dir).folder)
    rescored = runmod.evaluate_model(profile, "base", judges=judges)
    phases = _phases(folder)
    assert (track / "honest.jsonl").is_file() and phases["honest"]["likelihood_s"] > 0
    assert profile_cache(profile.run_dir).folder.is_dir()  # the model's log-probabilities were stored again
    assert phases["helpful"]["reused_likelihood"] and not phases["honest"]["reused_likelihood"]
    # reused phases keep the time the run that produced them spent (the manifest says what each part cost)
    assert phases["helpful"]["likelihood_s"] == first_phases["helpful"]["likelihood_s"] > 0
    assert phases["helpful"]["generate_s"] == first_phases["helpful"]["generate_s"] > 0
    assert phases["helpful"]["reused_generations"]
    assert _scores(rescored) == _scores(first)
    for task, values in first["likelihood"].items():
        assert rescored["likelihood"][task] == pytest.approx(values)

    # Changed judge: generations reused, only re-judged.
    judges.helpful.validation = {"agreement": 0.6, "n_heldout": 10}
    rejudged = runmod.evaluate_model(profile, "base", judges=judges)
    phases = _phases(folder)
    assert all(phases[t]["reused_generations"] for t in [*profile.tasks, "xstest"])
    assert not phases["helpful"]["reused_judgements"]
    assert phases["harmless"]["reused_judgements"]
    assert _scores(rejudged) == _scores(first)

    # A fresh run directory with the same seed gives the same metrics (regenerated from scratch).
    fresh = profile.model_copy(update={"runs_dir": str(tmp_path)})
    regenerated = runmod.evaluate_model(fresh, "base", judges=judges)
    assert not _phases(store.eval_dir(fresh, "base"))["helpful"]["reused_generations"]
    assert _scores(regenerated) == _scores(first)

    # Stored generations can be re-judged without the model.
    assert _scores(runmod.score_generations(profile, "base", judges=judges)) == _scores(first)


def test_two_from_scratch_runs_write_the_same_metrics_bytes(tmp_path, judges):
    """An expert trained and evaluated from scratch in two runs folders: byte-identical metrics.json, although
    the expert's manifests differ in wall time, date and paths (they stay out of the model's identity)."""
    from h3fusion.experts import align, expert_dir

    written, manifests = [], []
    for run in ("a", "b"):
        fresh = load_profile("smoke", {"runs_dir": str(tmp_path / run)})
        align(fresh, "helpful")
        runmod.evaluate_model(fresh, "helpful", judges=judges)
        written.append(store.metrics_path(fresh, "helpful").read_bytes())
        manifests.append(read_manifest(expert_dir(fresh, "helpful")))
    assert manifests[0]["config"]["runs_dir"] != manifests[1]["config"]["runs_dir"]
    assert written[0] == written[1]
    assert "wall_time_s" not in json.loads(written[0])


def test_a_dimension_can_have_its_own_generation_cap():
    from h3fusion.config import ConfigError, load_profile

    p = load_profile("smoke", {"evaluation.max_new_tokens_by_dimension": {"helpful": 32}})
    assert p.evaluation.generation_for("helpful").max_new_tokens == 32
    assert p.evaluation.generation_for("honest") == p.evaluation.generation
    assert p.evaluation.longest_answer == 32
    with pytest.raises(ConfigError, match="unknown dimension"):
        load_profile("smoke", {"evaluation.max_new_tokens_by_dimension": {"funny": 32}})


@pytest.mark.slow
def test_models_evaluated_in_worker_processes_equal_one_process(tmp_path):
    """`evaluation.workers: 2`: two one-thread processes evaluating side by side (here both the same model into
    the same folder, so their atomic writes race) return what one process returns."""
    from h3fusion.evaluation.judges import load_judges
    from h3fusion.evaluation.parallel import evaluate_models

    one = load_profile("smoke", {"runs_dir": str(tmp_path)})
    alone = evaluate_models(one, ["base"], judges=load_judges(one))["base"]
    shutil.rmtree(store.eval_dir(one, "base"))
    two = load_profile("smoke", {"runs_dir": str(tmp_path), "evaluation.workers": 2})
    side_by_side = evaluate_models(two, ["base", "base"])
    assert side_by_side == {"base": alone}
    assert json.loads(store.metrics_path(two, "base").read_text()) == alone


def test_generation_cache_answers_a_repeated_call_of_the_same_model_only(tmp_path, monkeypatch):
    """`HFLanguageModel.generate` with a generation cache: the same model, prompt list, config, seed and stop
    strings read the stored answers; anything else generates; a damaged entry counts as missing."""
    from h3fusion.config import GenerationConfig
    from h3fusion.evaluation import lm as lm_mod
    from h3fusion.evaluation.generation_cache import GenerationCache, GenerationCall

    calls = []

    def fake_generate(model, tok, prompts, cfg, seed, **kwargs):
        calls.append(list(prompts))
        return [f"{p}:{seed}:{cfg.max_new_tokens}" for p in prompts]

    monkeypatch.setattr(lm_mod, "generate_texts", fake_generate)
    cache = GenerationCache(tmp_path / "generations")

    class _Model:
        def eval(self):
            return self

    def model(identity):
        m = lm_mod.HFLanguageModel(_Model(), tokenizer=None, progress=False)
        m.store_generations(cache, identity)
        return m

    cfg = GenerationConfig(max_new_tokens=4, batch_size=2)
    first = model("a").generate(["p", "q"], cfg, 1)
    assert model("a").generate(["p", "q"], cfg, 1) == first and len(calls) == 1
    model("b").generate(["p", "q"], cfg, 1)  # another model
    model("a").generate(["q", "p"], cfg, 1)  # another list (batching may differ)
    model("a").generate(["p", "q"], cfg, 2)  # another seed
    model("a").generate(["p", "q"], cfg.model_copy(update={"max_new_tokens": 5}), 1)
    assert len(calls) == 5
    cache.path("a", GenerationCall.of(["p", "q"], cfg, 1, lm_mod.DEFAULT_STOP_STRINGS)).write_text('["only one"]')
    assert model("a").generate(["p", "q"], cfg, 1) == first and len(calls) == 6
