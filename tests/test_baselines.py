"""Baselines on the tiny random Llama: merge invariants, ensemble invariants, the fuser prompt, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from h3fusion.baselines import registry
from h3fusion.baselines.ensembles import AdapterBank, TokenEnsemble, mixture_logprobs, perplexity_weights
from h3fusion.baselines.instruct import FUSER_PROMPT_TEMPLATE, fuser_prompt
from h3fusion.baselines.merging import (
    MergeError,
    MergeSpec,
    dare,
    merge_into,
    read_adapter,
    task_arithmetic,
    ties,
    trim,
)
from h3fusion.config import ConfigError, GenerationConfig, load_profile
from h3fusion.data import format_prompt, split_prompt
from h3fusion.evaluation.lm import HFLanguageModel
from h3fusion.models import load_tokenizer, tiny_random_llama
from tests.helpers import FakeRefusal

TARGETS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return load_profile("smoke", {"runs_dir": str(tmp_path_factory.mktemp("runs"))})


@pytest.fixture(scope="module")
def tok(profile):
    return load_tokenizer(profile)


def make_base(profile, tok, tiny=None):
    return tiny_random_llama(
        tiny or profile.model.tiny,
        len(tok),
        profile.seed,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def make_adapter(profile, tok, folder: Path, seed: int, tiny=None) -> Path:
    """A peft LoRA adapter with a non-trivial random B (peft initialises B to zero)."""
    torch.manual_seed(seed)
    lora = profile.experts.lora
    model = get_peft_model(
        make_base(profile, tok, tiny), LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=TARGETS)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(profile, tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(profile, tok, root / f"expert{i}", seed=i + 1) for i in range(3)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- merges


def test_merge_of_one_adapter_equals_peft_merge_and_unload(profile, tok, adapters):
    from peft import PeftModel

    reference = PeftModel.from_pretrained(make_base(profile, tok), str(adapters[0])).merge_and_unload()
    merged = make_base(profile, tok)
    merge_into(merged, [read_adapter(adapters[0])], MergeSpec("task_arithmetic", scale=1.0))
    ref, got = state(reference), state(merged)
    assert set(ref) == set(got)
    changed = [k for k in ref if "mlp" in k]
    assert changed and all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    assert not torch.allclose(
        got[changed[0]], state(make_base(profile, tok))[changed[0]]
    )  # the delta is not zero


def test_average_of_identical_adapters_is_that_adapter(profile, tok, adapters):
    one, three = make_base(profile, tok), make_base(profile, tok)
    merge_into(one, [read_adapter(adapters[0])], MergeSpec("task_arithmetic", scale=1.0))
    merge_into(three, [read_adapter(adapters[0])] * 3, MergeSpec("average"))
    a, b = state(one), state(three)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_merge_uses_full_deltas_not_factors(profile, tok, adapters):
    """The average of (B_i A_i) differs from (mean B)(mean A): the merge must be the former."""
    ads = [read_adapter(a) for a in adapters[:2]]
    key = next(iter(ads[0].factors))
    merged = make_base(profile, tok)
    before = dict(make_base(profile, tok).named_parameters())[key].detach()
    merge_into(merged, ads, MergeSpec("average"))
    got = dict(merged.named_parameters())[key].detach() - before
    full = (ads[0].factors[key].delta() + ads[1].factors[key].delta()) / 2
    f0, f1 = ads[0].factors[key], ads[1].factors[key]
    factors = f0.scale * ((f0.b + f1.b) / 2) @ ((f0.a + f1.a) / 2)
    assert torch.allclose(got, full, atol=1e-6)
    assert not torch.allclose(got, factors, atol=1e-4)


def agreeing_deltas(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    sign = torch.randn(shape, generator=g).sign()
    return torch.stack([sign * (torch.rand(shape, generator=g) + 0.1) for _ in range(n)])


def test_ties_density_one_with_agreeing_signs_is_task_arithmetic():
    deltas = agreeing_deltas()
    n = deltas.shape[0]
    # all signs agree and nothing is trimmed: the disjoint mean is the plain mean = task arithmetic with lambda / n
    assert torch.allclose(ties(deltas, 1.0, 0.7), task_arithmetic(deltas, 0.7 / n), atol=1e-6)
    assert torch.allclose(ties(deltas[:1], 1.0, 0.7), task_arithmetic(deltas[:1], 0.7), atol=1e-6)


def test_ties_drops_disagreeing_entries_and_trims():
    d = torch.tensor([[[1.0, -2.0, 0.5]], [[3.0, 1.0, -0.1]]])
    # entry 0: both +, mean 2; entry 1: sum -1 -> sign -, only -2 kept; entry 2: sum 0.4 -> +, only 0.5 kept
    assert torch.allclose(ties(d, 1.0, 1.0), torch.tensor([[2.0, -2.0, 0.5]]))
    t = trim(torch.tensor([[0.1, -3.0, 2.0, 0.2]]), 0.5)
    assert torch.equal(t, torch.tensor([[0.0, -3.0, 2.0, 0.0]]))


def test_dare_without_drop_is_task_arithmetic_and_drop_is_seeded():
    deltas = agreeing_deltas()
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(dare(deltas, 0.0, 0.5, gen), task_arithmetic(deltas, 0.5))
    a = dare(deltas[:1], 0.5, 1.0, torch.Generator().manual_seed(1))
    b = dare(deltas[:1], 0.5, 1.0, torch.Generator().manual_seed(1))
    c = dare(deltas[:1], 0.5, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert 0 < kept.sum() < a.numel()  # some entries dropped, some kept
    assert torch.allclose(a[kept], deltas[0][kept] / 0.5)  # survivors rescaled by 1 / (1 - p)


@pytest.mark.parametrize("kwargs", [{"density": 0.0}, {"density": 1.5}, {"density": -0.1}])
def test_density_outside_unit_interval_is_refused(kwargs):
    with pytest.raises(MergeError, match="density"):
        MergeSpec("ties", **kwargs)


@pytest.mark.parametrize("drop", [1.0, 1.2, -0.1])
def test_drop_rate_outside_range_is_refused(drop):
    with pytest.raises(MergeError, match="drop rate"):
        MergeSpec("dare", drop_rate=drop)


def test_profile_refuses_bad_density(profile):
    with pytest.raises(ConfigError, match="ties_density"):
        load_profile("smoke", {"baselines.ties_density": 0})
    with pytest.raises(ConfigError, match="dare_drop_rate"):
        load_profile("smoke", {"baselines.dare_drop_rate": 1.0})


def test_adapters_of_different_bases_are_refused(profile, tok, adapters, tmp_path):
    other = make_adapter(
        profile,
        tok,
        tmp_path / "other",
        seed=9,
        tiny=profile.model.tiny.model_copy(update={"intermediate_size": 96}),
    )
    with pytest.raises(MergeError, match="shape"):
        merge_into(
            make_base(profile, tok), [read_adapter(adapters[0]), read_adapter(other)], MergeSpec("average")
        )
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in adapters[1].iterdir():
        (renamed / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/other-model"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    first = json.loads((adapters[0] / "adapter_config.json").read_text())
    if not first.get("base_model_name_or_path"):
        cfg0 = tmp_path / "first"
        cfg0.mkdir()
        for f in adapters[0].iterdir():
            (cfg0 / f.name).write_bytes(f.read_bytes())
        first["base_model_name_or_path"] = "tiny/base"
        (cfg0 / "adapter_config.json").write_text(json.dumps(first))
        first_dir = cfg0
    else:
        first_dir = adapters[0]
    with pytest.raises(MergeError, match="different base models"):
        merge_into(
            make_base(profile, tok), [read_adapter(first_dir), read_adapter(renamed)], MergeSpec("average")
        )


def test_not_an_adapter_folder_is_refused(tmp_path):
    with pytest.raises(MergeError, match="not a complete peft LoRA adapter folder"):
        read_adapter(tmp_path)


# ---------------------------------------------------------------------------------------------- ensembles

PROMPTS = [format_prompt("Name a colour."), format_prompt("What is the capital of France?")]


def test_uniform_ensemble_of_identical_experts_is_that_expert(profile, tok, adapters):
    from peft import PeftModel

    bank = AdapterBank(make_base(profile, tok), {n: adapters[0] for n in ("a", "b", "c")})
    ensemble = TokenEnsemble(bank, tok, progress=False)
    single = HFLanguageModel(
        PeftModel.from_pretrained(make_base(profile, tok), str(adapters[0])).merge_and_unload(),
        tok,
        progress=False,
    )
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2)
    assert ensemble.generate(PROMPTS, cfg, 0) == single.generate(PROMPTS, cfg, 0)
    conts = [" Blue.", " Paris."]
    got, want = ensemble.continuation_logprobs(PROMPTS, conts), single.continuation_logprobs(PROMPTS, conts)
    assert got == pytest.approx(want, abs=1e-4)


def test_ensemble_of_different_experts_mixes_probabilities(profile, tok, adapters):
    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1]})
    both = TokenEnsemble(bank, tok, progress=False).continuation_logprobs(PROMPTS[:1], [" Blue"])[0]
    singles = [
        TokenEnsemble(bank, tok, experts=[e], progress=False).continuation_logprobs(PROMPTS[:1], [" Blue"])[0]
        for e in ("a", "b")
    ]
    # one-token continuation: log of the average of the two probabilities
    want = torch.logsumexp(torch.tensor(singles), 0) - torch.log(torch.tensor(2.0))
    assert both == pytest.approx(float(want), abs=1e-4)


def test_packllm_mixture_of_a_multi_token_answer_matches_full_forwards(profile, tok, adapters):
    """sum_t log sum_i w_i p_i(token t): checked against one full forward of prompt + answer per expert."""
    from h3fusion.evaluation.lm import split_continuation

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    ensemble = TokenEnsemble(bank, tok, weighting="perplexity", temperature=0.5, progress=False)
    conts = [" Blue and green.", " Paris, in France.", " Lyon."]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    got = ensemble.continuation_logprobs(prompts, conts)
    weights = ensemble.prompt_weights(PROMPTS)
    for k, (prompt, cont) in enumerate(zip(prompts, conts, strict=True)):
        ctx, ans = split_continuation(tok, prompt, cont)
        ids = torch.tensor([ctx + ans])
        per_expert = []
        for e in ("a", "b", "c"):
            with torch.no_grad():
                logp = torch.log_softmax(bank.use(e)(input_ids=ids).logits[0, :-1].double(), -1)
            per_expert.append(logp[len(ctx) - 1 :].gather(-1, ids[0, len(ctx) :, None]).squeeze(-1))
        w = weights[PROMPTS.index(prompt)].double()
        want = torch.logsumexp(torch.stack(per_expert) + w.log()[:, None], dim=0).sum()
        assert got[k] == pytest.approx(float(want), abs=1e-4)


def test_perplexity_weights_sum_to_one_and_favour_low_perplexity():
    nll = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 0.5]])
    w = perplexity_weights(nll, temperature=1.0)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert w[0].argmax() == 1 and torch.allclose(w[1], torch.full((3,), 1 / 3))
    assert (
        perplexity_weights(nll, 0.1)[0, 1] > w[0, 1]
    )  # a lower temperature sharpens towards the best expert


def test_prompt_perplexities_with_the_shared_prefix_equal_full_forwards(profile, tok, adapters):
    """PackLLM's MC weights (prompt NLLs scored after the prompts' shared prefix) are the weights generation
    computes from one full forward of each prompt."""
    from h3fusion.evaluation.generate import encode_prompts

    def mean_prompt_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return -logp.mean(-1)

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    ensemble = TokenEnsemble(bank, tok, weighting="perplexity", progress=False)
    got = ensemble._prompt_nll(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([encode_prompts(tok, [prompt])[0]])
        for j, e in enumerate(("a", "b", "c")):
            with torch.no_grad():
                want = mean_prompt_nll(bank.use(e)(input_ids=ids).logits, ids)
            assert float(got[i, j]) == pytest.approx(float(want[0]), abs=1e-4)


def test_packllm_prompt_weights_are_the_softmax_of_negative_prompt_nll(profile, tok, adapters):
    """PackLLM-sim: w = softmax(-mean prompt NLL / tau) over experts, the NLL recomputed here by a full forward."""
    from h3fusion.evaluation.generate import encode_prompts

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    tau = 0.05
    w = TokenEnsemble(bank, tok, weighting="perplexity", temperature=tau, progress=False).prompt_weights(
        PROMPTS
    )
    nll = torch.zeros(len(PROMPTS), 3)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([encode_prompts(tok, [prompt])[0]])
        for j, e in enumerate(("a", "b", "c")):
            with torch.no_grad():
                logp = torch.log_softmax(bank.use(e)(input_ids=ids).logits[0, :-1].float(), -1)
            nll[i, j] = -logp.gather(-1, ids[0, 1:, None]).mean()
    torch.testing.assert_close(w, torch.softmax(-nll / tau, dim=-1), atol=1e-3, rtol=0)
    assert (w.argmax(-1) == nll.argmin(-1)).all()  # the expert that finds the prompt likeliest weighs most
    assert (w.max(-1).values - w.min(-1).values > 0.01).all()  # far from uniform at this temperature


def test_mixture_of_one_distribution_is_its_log_softmax():
    logits = torch.randn(2, 11)
    assert torch.allclose(
        mixture_logprobs([logits], torch.ones(2, 1)), torch.log_softmax(logits, -1), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- instruct


def test_fuser_prompt_contains_request_and_every_answer():
    answers = {"helpful": "Paris is the capital.", "harmless": "I can help: Paris.", "honest": "It is Paris."}
    request = split_prompt(format_prompt("What is the capital of France?"))
    assert request == "What is the capital of France?"
    prompt = fuser_prompt(request, answers)
    assert request in prompt and all(a in prompt for a in answers.values())
    assert all(f"{t} assistant" in prompt for t in answers)
    assert prompt.endswith("### Response:\n") and "{request}" in FUSER_PROMPT_TEMPLATE


def test_split_prompt_keeps_the_input():
    assert split_prompt(format_prompt("Translate.", "Bonjour")) == "Translate.\n\nBonjour"
    assert split_prompt("plain text") == "plain text"


# ---------------------------------------------------------------------------------------------- registry


def test_every_baseline_has_description_and_reference():
    for b in registry.BASELINES.values():
        assert b.description and b.reference and b.kind in ("merge", "ensemble", "data-mix", "instruct")
    refs = " ".join(b.reference for b in registry.BASELINES.values())
    for arxiv in ("2306.01708", "2311.03099", "2212.04089", "2203.05482", "2404.11531", "2502.06876"):
        assert arxiv in refs


def test_unknown_baseline_lists_the_known_ones(profile):
    from h3fusion.baselines import run_baselines

    with pytest.raises(registry.UnknownBaselineError, match="merge-ties"):
        registry.get_baseline("merge-tis")
    with pytest.raises(registry.UnknownBaselineError, match="known baselines"):
        run_baselines(profile, only="nope")


def test_missing_experts_name_the_command(tmp_path):
    from h3fusion.baselines import build_baseline
    from h3fusion.errors import ArtifactError

    with pytest.raises(ArtifactError, match="h3fusion align"):
        build_baseline(load_profile("smoke", {"runs_dir": str(tmp_path)}), "merge-average")


# ---------------------------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def with_experts(profile, adapters):
    """The random adapters installed as the profile's experts (complete manifests with the experts' hash)."""
    import shutil

    from h3fusion.artifacts import atomic_write_json, make_manifest
    from h3fusion.experts import expert_dir, expert_hash

    for task, folder in zip(profile.tasks, adapters, strict=False):
        dest = expert_dir(profile, task)
        shutil.copytree(folder, dest)
        atomic_write_json(
            dest / "manifest.json", make_manifest(profile, expert_hash(profile), 0.0, task=task)
        )
    return profile


def test_build_writes_skips_and_rebuilds_on_change(with_experts, tok, adapters):
    from h3fusion.artifacts import read_manifest
    from h3fusion.baselines import build_baseline, load_baseline

    profile = with_experts
    folder = build_baseline(profile, "merge-ties")
    manifest = read_manifest(folder)
    assert manifest["wall_time_s"] >= 0 and manifest["baseline"] == "merge-ties"
    assert (
        json.loads((folder / "baseline.json").read_text())["params"]["density"]
        == profile.baselines.ties_density
    )
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    build_baseline(profile, "merge-ties")
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # complete with the same config: skipped
    changed = profile.model_copy(
        update={"baselines": profile.baselines.model_copy(update={"ties_density": 0.5})}
    )
    build_baseline(changed, "merge-ties")
    assert read_manifest(folder)["config_hash"] != manifest["config_hash"]

    lm = load_baseline(changed, "merge-ties")  # a dense folder: the merged weights, loadable without peft
    want = make_base(profile, tok)
    merge_into(
        want, [read_adapter(a) for a in adapters[: profile.num_experts]], MergeSpec("ties", density=0.5)
    )
    got = dict(lm.model.named_parameters())
    assert all(torch.allclose(got[k], p, atol=1e-6) for k, p in want.named_parameters())


def test_ensembles_and_instruct_build_and_load_as_language_models(with_experts, monkeypatch):
    from h3fusion.baselines import build_baseline, load_baseline
    from h3fusion.baselines.instruct import InstructFusion
    from h3fusion.baselines.select import SelectEnsemble
    from h3fusion.evaluation.lm import LanguageModel

    profile = with_experts
    for name, kind in (
        ("ensemble-packllm", TokenEnsemble),
        ("ensemble-select", SelectEnsemble),
        ("instruct-zeroshot", InstructFusion),
    ):
        build_baseline(profile, name)
        lm = load_baseline(profile, name)
        assert isinstance(lm, kind) and isinstance(lm, LanguageModel)
    assert lm.bank.names == profile.tasks  # one base model, one adapter per expert


# ---------------------------------------------------------------------------------------------- reuse of the experts' answers


class _Helpful:
    name, validation = "fake-helpful", {}

    def win_probability(self, requests, answers, others):
        return [1.0 if len(a) > len(b) else 0.25 for a, b in zip(answers, others, strict=True)]


class _Harmless:
    name, validation = "fake-harmless", {}

    def harmful_probability(self, requests, answers):
        return [0.75 if len(a) % 2 else 0.1 for a in answers]


class _Honest:
    name, validation = "fake-honest", {}

    def judge(self, questions, answers, correct, incorrect):
        return [{"truthful": len(a) % 3 != 0, "informative": bool(a.strip())} for a in answers]


def fake_judges():
    from types import SimpleNamespace

    return SimpleNamespace(helpful=_Helpful(), harmless=_Harmless(), honest=_Honest(), refusal=FakeRefusal())


def install_experts(profile, adapters):
    import shutil

    from h3fusion.artifacts import atomic_write_json, make_manifest
    from h3fusion.experts import expert_dir, expert_hash

    for task, folder in zip(profile.tasks, adapters, strict=False):
        shutil.copytree(folder, expert_dir(profile, task))
        atomic_write_json(
            expert_dir(profile, task) / "manifest.json",
            make_manifest(profile, expert_hash(profile), 0.0, task=task),
        )
    return profile


@pytest.fixture()
def own_experts(adapters, tmp_path):
    """A fresh run folder with the random adapters as the smoke profile's experts (nothing evaluated yet)."""
    return install_experts(load_profile("smoke", {"runs_dir": str(tmp_path / "runs")}), adapters)


def count_expert_generations(monkeypatch):
    """Counts the experts' answer generations of the ensembles (cached answers make none)."""
    from h3fusion.baselines import answers

    calls = []
    real = answers.generate_texts

    def counting(model, tok, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(answers, "generate_texts", counting)
    return calls


def test_merged_adapter_generates_like_the_evaluated_expert_and_restores_the_base(profile, tok, adapters):
    from peft import PeftModel

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1]})
    before = state(bank.model)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    with bank.merged("b") as model:
        merged_w = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        got = HFLanguageModel(model, tok, progress=False).generate(PROMPTS, cfg, 0)
    expert = PeftModel.from_pretrained(make_base(profile, tok), str(adapters[1])).merge_and_unload()
    want = HFLanguageModel(expert, tok, progress=False).generate(PROMPTS, cfg, 0)
    assert got == want  # the tokens the expert's own evaluation generates
    ref = expert.state_dict()
    assert all(
        torch.equal(w, ref[k.replace("base_model.model.", "").replace(".base_layer", "")])
        for k, w in merged_w.items()
    )  # bit for bit the merge_and_unload weights
    after = state(bank.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the exact base weights are back
    assert not any(m.merged for m in bank.model.modules() if hasattr(m, "merged_adapters"))


def test_known_answers_hit_only_for_the_same_model_list_config_and_seed(tmp_path):
    from h3fusion.baselines.answers import KnownAnswers
    from h3fusion.evaluation.generation_cache import GenerationCache, GenerationCall

    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)

    def call(prompts=("p1", "p2"), config=cfg, seed=42, stops=("###",)):
        return GenerationCall.of(prompts, config, seed, stops)

    known = KnownAnswers(GenerationCache(tmp_path), {"a": "identity-a", "b": "identity-b"})
    assert known.lookup("a", call()) is None
    known.store("a", call(), ["x", "y"])
    assert known.lookup("a", call()) == ["x", "y"]
    retrained = KnownAnswers(GenerationCache(tmp_path), {"a": "identity-a2"})
    assert retrained.lookup("a", call()) is None  # another expert's weights
    assert known.lookup("a", call(("p2", "p1"))) is None  # another batching: generated
    assert known.lookup("a", call(("p1",))) is None
    assert known.lookup("b", call()) is None
    assert known.lookup("a", call(seed=7)) is None
    assert known.lookup("a", call(config=cfg.model_copy(update={"max_new_tokens": 9}))) is None
    assert known.lookup("a", call(stops=())) is None


def test_instruct_scores_a_few_shot_mc_pair_as_its_alpaca_question(profile, tok, adapters):
    """qa6 MC prompts reach H3Fusion-Instruct as the Alpaca prompt of their last question: same scores, and the
    demonstrations never reach the experts or the fuser."""
    from h3fusion.baselines.instruct import InstructFusion, instruction_prompt
    from h3fusion.evaluation.mc import mc_prompt

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1]})
    cfg = GenerationConfig(max_new_tokens=4, batch_size=2)
    qa6, alpaca = mc_prompt("qa6"), mc_prompt("alpaca")
    question, choices = "Is the sky blue?", ["Yes.", "No, it is green."]
    fusion = InstructFusion(bank, tok, ["a", "b"], cfg, seed=1, progress=False)
    few_shot = fusion.continuation_logprobs([qa6.template(question)] * 2, [" " + c for c in choices])
    assert fusion.last_prompts == [] and all("Olympics" not in p for p in fusion._candidates)
    plain = fusion.continuation_logprobs([alpaca.template(question)] * 2, choices)
    assert few_shot == plain
    assert instruction_prompt(alpaca.template(question), " x") == (alpaca.template(question), " x")


def test_reused_expert_answers_give_the_regenerated_final_answers(own_experts, monkeypatch):
    """ensemble-select and H3Fusion-Instruct from the answers the experts' evaluations stored in the generation
    cache answer exactly as when they generate the experts' answers themselves, and generate none of them."""
    from h3fusion.baselines import answers, shared
    from h3fusion.baselines.instruct import InstructFusion
    from h3fusion.baselines.select import SelectEnsemble
    from h3fusion.evaluation.run import evaluate_model

    profile, judges = own_experts, fake_judges()
    for task in profile.tasks:
        evaluate_model(profile, task, judges=judges)
    known = answers.known_answers(profile)
    from h3fusion.data import format_prompt
    from h3fusion.data.splits import xstest_eval_items
    from h3fusion.evaluation import overrefusal
    from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
    from h3fusion.evaluation.generation_cache import GenerationCall
    from h3fusion.evaluation.inputs import profile_inputs

    assert overrefusal.enabled(profile)
    inputs = profile_inputs(profile)
    seed = profile.seed
    xstest = [format_prompt(it["prompt"]) for it in xstest_eval_items(profile)]
    asked = [(inputs[d].prompts, profile.evaluation.generation_for(d)) for d in profile.tasks]
    asked.append((xstest, profile.evaluation.generation))
    for expert in profile.expert_names:  # every expert's answers on every dimension and the XSTest prompts
        for prompts, gen in asked:
            assert known.lookup(expert, GenerationCall.of(prompts, gen, seed, DEFAULT_STOP_STRINGS)) is not None
    bank, tok = shared.expert_bank(profile)

    def cfg(d):
        return profile.evaluation.generation_for(d)

    def longest(prompts, candidates):  # any selector that reads the candidates
        return [max(range(len(cs)), key=lambda j, cs=cs: (len(cs[j]), -j)) for cs in candidates]

    def lms(k):
        return (
            SelectEnsemble(bank, tok, longest, known=k, progress=False),
            InstructFusion(
                bank, tok, profile.tasks, profile.evaluation.generation, seed=seed, known=k, progress=False
            ),
        )

    calls = count_expert_generations(monkeypatch)
    reused = {d: [lm.generate(inputs[d].prompts, cfg(d), seed) for lm in lms(known)] for d in profile.tasks}
    select_reused = lms(known)[0]
    select_reused.generate(inputs["honest"].prompts, cfg("honest"), seed)
    assert calls == []  # no expert answer was generated
    regenerated = {
        d: [lm.generate(inputs[d].prompts, cfg(d), seed) for lm in lms(None)] for d in profile.tasks
    }
    assert calls  # the regenerate path did generate them
    assert reused == regenerated
    select_fresh = lms(None)[0]
    select_fresh.generate(inputs["honest"].prompts, cfg("honest"), seed)
    assert select_reused.last_candidates == select_fresh.last_candidates
    assert any(a for cs in select_fresh.last_candidates for a in cs)  # non-trivial answers were compared


def test_stale_expert_answers_are_not_reused(own_experts):
    from h3fusion.baselines import answers
    from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
    from h3fusion.evaluation.generation_cache import GenerationCall
    from h3fusion.evaluation.inputs import profile_inputs
    from h3fusion.evaluation.run import evaluate_model

    first, *others = own_experts.expert_names
    evaluate_model(own_experts, first, judges=fake_judges())
    prompts = profile_inputs(own_experts)["helpful"].prompts

    def hits(profile):
        known, cfg = answers.known_answers(profile), profile.evaluation.generation_for("helpful")
        call = GenerationCall.of(prompts, cfg, profile.seed, DEFAULT_STOP_STRINGS)
        return [e for e in profile.expert_names if known.lookup(e, call)]

    assert hits(own_experts) == [first]
    ev = own_experts.evaluation
    longer = own_experts.model_copy(
        update={
            "evaluation": ev.model_copy(
                update={
                    "generation": ev.generation.model_copy(
                        update={"max_new_tokens": ev.generation.max_new_tokens + 1}
                    ),
                    "max_new_tokens_by_dimension": {
                        d: n + 1 for d, n in ev.max_new_tokens_by_dimension.items()
                    },
                }
            )
        }
    )
    assert hits(longer) == []  # generated with another config: regenerate


def test_uniform_and_packllm_share_the_experts_token_logprobs(profile, tok, adapters):
    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    store: dict = {}
    conts = [" Blue.", " Paris is the capital."]
    uniform = TokenEnsemble(bank, tok, token_logprobs=store, progress=False)
    packllm = TokenEnsemble(bank, tok, weighting="perplexity", token_logprobs=store, progress=False)
    want_u = TokenEnsemble(bank, tok, progress=False).continuation_logprobs(PROMPTS, conts)
    want_p = TokenEnsemble(bank, tok, weighting="perplexity", progress=False).continuation_logprobs(
        PROMPTS, conts
    )
    assert uniform.continuation_logprobs(PROMPTS, conts) == want_u
    filled = len(store)
    assert (
        filled and packllm.continuation_logprobs(PROMPTS, conts) == want_p
    )  # exact, from the stored forwards
    assert len(store) == filled and want_p != want_u


def test_a_baseline_before_the_experts_evaluations_stores_their_answers_for_them(own_experts, monkeypatch):
    """ensemble-select built before any expert is evaluated generates the experts' answers itself (it does not run
    their evaluations); the experts' evaluations afterwards read those answers instead of generating them."""
    from h3fusion.baselines import run_baselines
    from h3fusion.evaluation import judges as judges_mod
    from h3fusion.evaluation import lm as lm_mod
    from h3fusion.evaluation.run import evaluate_model
    from h3fusion.evaluation.store import eval_dir, read_jsonl

    loads = []
    monkeypatch.setattr(judges_mod, "load_judges", lambda p: loads.append(1) or fake_judges())
    profile = own_experts
    calls = count_expert_generations(monkeypatch)
    metrics = run_baselines(profile, only="ensemble-select")
    assert set(metrics) == {"ensemble-select"} and loads == [1]  # the judges loaded once
    assert calls and not any(eval_dir(profile, e).exists() for e in profile.expert_names)
    evaluated = []
    real = lm_mod.generate_texts
    monkeypatch.setattr(lm_mod, "generate_texts", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    for expert in profile.expert_names:
        evaluate_model(profile, expert, judges=fake_judges())
    assert evaluated == []  # every expert answer came from the cache
    for task in profile.tasks:
        experts_answers = [
            [r["answer"] for r in read_jsonl(eval_dir(profile, e) / "generations" / f"{task}.jsonl")]
            for e in profile.tasks
        ]
        chosen = [
            r["answer"]
            for r in read_jsonl(eval_dir(profile, "ensemble-select") / "generations" / f"{task}.jsonl")
        ]
        assert all(c in [a[i] for a in experts_answers] for i, c in enumerate(chosen))


def naive_mixture_greedy(bank, tok, prompts, experts, weights, new_tokens):
    """Greedy decoding from sum_i w_i p_i, every step a full forward of each prompt + answer so far, per expert
    and per prompt (no cache, no padding, no mixed batch): what the one-pass ensemble must reproduce."""
    from h3fusion.evaluation.generate import encode_prompts

    out = []
    for k, ids in enumerate(encode_prompts(tok, prompts)):
        seq = list(ids)
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = [bank.use(e)(input_ids=torch.tensor([seq])).logits[:, -1] for e in experts]
            seq.append(int(mixture_logprobs(logits, weights[k : k + 1]).argmax(-1)))
        out.append(seq[len(ids) :])
    return out


@pytest.mark.parametrize("weighting", ["uniform", "perplexity"])
def test_one_pass_mixed_adapter_decoding_equals_separate_expert_forwards(profile, tok, adapters, weighting):
    """All experts in one forward per step (peft mixed-adapter batch, left-padded prompts of other lengths, one
    KV cache) give the tokens of a naive per-expert, per-prompt decoding from the same mixture."""
    from h3fusion.evaluation.generate import cut_at_stop

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    ensemble = TokenEnsemble(bank, tok, weighting=weighting, temperature=0.5, stop_strings=(), progress=False)
    prompts = [*PROMPTS, format_prompt("Say something long about the sea and the sky.")]
    cfg = GenerationConfig(max_new_tokens=5, batch_size=3)
    eos = set(tok.all_special_ids)
    want = naive_mixture_greedy(bank, tok, prompts, ("a", "b", "c"), ensemble.prompt_weights(prompts), 5)
    for got, tokens in zip(ensemble.generate(prompts, cfg, 0), want, strict=True):
        kept = next((tokens[:j] for j, t in enumerate(tokens) if t in eos), tokens)
        assert got == cut_at_stop(tok.decode(kept, skip_special_tokens=True), ())


def test_ensemble_mixes_the_experts_stored_logprobs_and_stores_missing_ones(profile, tok, adapters, tmp_path):
    """With the cache of expert evaluations, an ensemble reads each expert's per-token log-probabilities from
    what the expert's own (merged) model stored, computes a missing expert merged and stores it, and scores
    the same as without the cache."""
    from peft import PeftModel

    from h3fusion.evaluation.logprob_cache import TokenLogprobCache

    cache = TokenLogprobCache(tmp_path / "cache")
    identities = {"a": "id-a", "b": "id-b", "c": "id-c"}
    conts = [" Blue and green.", " Paris, in France."]
    expert_a = HFLanguageModel(
        PeftModel.from_pretrained(make_base(profile, tok), str(adapters[0])).merge_and_unload(), tok, progress=False
    )
    expert_a.store_logprobs(cache, identities["a"])
    stored_a = expert_a.continuation_token_logprobs(PROMPTS, conts)  # the expert's evaluation stores its values
    assert cache.get("id-a", PROMPTS, conts) == stored_a

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    plain = TokenEnsemble(bank, tok, progress=False).continuation_logprobs(PROMPTS, conts)
    cached = TokenEnsemble(bank, tok, expert_logprobs=(cache, identities), progress=False)
    assert cached.continuation_logprobs(PROMPTS, conts) == pytest.approx(plain, abs=1e-4)
    assert cache.get("id-b", PROMPTS, conts) is not None and cache.get("id-c", PROMPTS, conts) is not None

    # a stored value is what the ensemble mixes: shift expert a's stored values and the mixture moves
    cache.put("id-a", PROMPTS, conts, [[v - 50.0 for v in row] for row in stored_a])
    shifted = TokenEnsemble(bank, tok, expert_logprobs=(cache, identities), progress=False)
    weights = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    for k, row in enumerate(shifted.continuation_logprobs(PROMPTS, conts)):
        per_expert = torch.tensor(
            [[v - 50.0 for v in stored_a[k]], *(cache.get(i, PROMPTS, conts)[k] for i in ("id-b", "id-c"))],
            dtype=torch.float64,
        )
        assert row == pytest.approx(float(torch.logsumexp(per_expert + weights[:, None], 0).sum()), abs=1e-6)
    assert cache.get("other-identity", PROMPTS, conts) is None  # a re-trained expert misses


def test_lora_fuser_trains_only_its_adapter_through_the_trainer(profile, tok, adapters):
    """The LoRA fuser trains like the experts (the Trainer: linear decay, clipping): only its own adapter moves,
    the experts' adapters and the base stay as they were, the loss is logged every step, and nothing is left
    trainable afterwards."""
    from h3fusion.baselines.instruct import train_fuser
    from h3fusion.config import LoraConfig as ProfileLora
    from h3fusion.config import TrainConfig
    from h3fusion.data import TrainExample

    bank = AdapterBank(make_base(profile, tok), {"a": adapters[0], "b": adapters[1]})
    before = state(bank.model)
    examples = [TrainExample("helpful", f"Say {w}.", "", f"{w} {w} {w}.") for w in ("yes", "no", "maybe", "so")]
    train = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, logging_steps=1)
    log = train_fuser(bank, tok, examples, ProfileLora(r=2, alpha=4, target_modules=TARGETS), train, 64, 7, "fuser")
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] > 0 for e in log)
    after = state(bank.model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # base and experts untouched
    fuser_b = [k for k in after if ".fuser." in k and "lora_B" in k]
    assert fuser_b and all(after[k].abs().sum() > 0 for k in fuser_b)  # peft starts B at zero: it trained
    assert not any(p.requires_grad for p in bank.model.parameters())
