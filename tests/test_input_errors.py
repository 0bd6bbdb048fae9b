"""Bad inputs get one clear error before any heavy work, and leave nothing written (issue 14, item 3).

Experts are faked cheaply: an untrained peft LoRA on a tiny random Llama (of the smoke shape, or of another shape
to play an expert of another base), saved with a manifest of the profile's expert hash, as `align` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from h3fusion.artifacts import MANIFEST, atomic_dir, atomic_write_json, make_manifest
from h3fusion.cli import main
from h3fusion.config import ConfigError, Profile, load_profile
from h3fusion.data import offline
from h3fusion.errors import ArtifactError, DataError, ModelError
from h3fusion.experts import align, expert_dir, expert_hash, load_expert_adapter_weights
from h3fusion.lora_files import ADAPTER_WEIGHTS

RAW = offline.OFFLINE_DIR
MC_FILE = Path("truthfulqa") / "v0" / "mc_task.json"


def _smoke(tmp_path: Path, **overrides: object) -> Profile:
    return load_profile("smoke", {"runs_dir": str(tmp_path / "runs"), **overrides})


def _cli(tmp_path: Path, command: str, *args: str) -> list[str]:
    return [command, "--profile", "smoke", "--set", f"runs_dir={tmp_path / 'runs'}", *args]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _written(profile: Profile) -> list[str]:
    """Everything under the profile's artifact folder (nothing, when a refused command wrote nothing)."""
    root = profile.run_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _fake_expert(profile: Profile, task: str, **tiny: int) -> Path:
    """An untrained LoRA expert on a tiny Llama of the profile's shape updated by `tiny`, as a complete artifact."""
    from peft import LoraConfig, get_peft_model

    from h3fusion.models import load_tokenizer, tiny_random_llama
    from h3fusion.moe import PROJECTIONS

    base = tiny_random_llama(profile.model.tiny.model_copy(update=tiny), len(load_tokenizer(profile)), 0)
    lora = profile.experts.lora
    model = get_peft_model(
        base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(PROJECTIONS))
    )
    with atomic_dir(expert_dir(profile, task)) as tmp:
        model.save_pretrained(tmp)
        manifest = make_manifest(profile, expert_hash(profile), 0.0, stage="experts", task=task)
        atomic_write_json(tmp / MANIFEST, manifest)
    return expert_dir(profile, task)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- 1. MC labels


def _data_dir_with_mc_label(tmp_path: Path, field: str, label: object) -> tuple[Path, str]:
    """A copy of the shipped data (links) whose mc_task.json gives the first answer of the first evaluated question's
    `field` the label `label`; returns the folder and that question."""
    from h3fusion.data.splits import truthfulqa_halves

    data = tmp_path / "data"
    for entry in RAW.iterdir():
        if entry.name != "truthfulqa":
            (data / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (data / entry.name).symlink_to(entry)
    for entry in (RAW / "truthfulqa").rglob("*"):
        if entry.is_file() and entry.relative_to(RAW) not in (
            MC_FILE,
            MC_FILE.with_name(MC_FILE.name + ".xz"),
        ):
            (data / entry.relative_to(RAW)).parent.mkdir(parents=True, exist_ok=True)
            (data / entry.relative_to(RAW)).symlink_to(entry)
    _, eval_rows, _ = truthfulqa_halves(_smoke(tmp_path))
    question = eval_rows[0]["question"].strip()
    records = json.loads(offline.read_bytes(offline.find(RAW, str(MC_FILE))))
    record = next(r for r in records if r["question"].strip() == question)
    record[field][next(iter(record[field]))] = label
    (data / MC_FILE).parent.mkdir(parents=True, exist_ok=True)
    (data / MC_FILE).write_text(json.dumps(records))
    return data, question


@pytest.mark.parametrize("field", ["mc1_targets", "mc2_targets"])
def test_mc_label_that_is_not_0_or_1_names_file_question_and_field(tmp_path, field):
    from h3fusion.data import load_eval_items

    data, question = _data_dir_with_mc_label(tmp_path, field, "yes")
    profile = _smoke(tmp_path, **{"data.dir": str(data)})
    with pytest.raises(DataError) as err:
        load_eval_items(profile, "honest")
    msg = str(err.value)
    assert str(data / MC_FILE) in msg and question in msg and f"field {field!r}" in msg
    assert "the label 'yes'; MC labels must be the integers 0 or 1" in msg


def test_evaluate_with_a_string_mc_label_writes_nothing(tmp_path, capsys):
    data, _ = _data_dir_with_mc_label(tmp_path, "mc1_targets", "yes")
    argv = _cli(tmp_path, "evaluate", "--set", f"data.dir={data}", "--model", "base")
    code, err = _run(argv, capsys)
    assert code == 2
    assert (
        err.startswith("h3fusion evaluate: error: malformed record")
        and "MC labels must be the integers" in err
    )
    assert _written(_smoke(tmp_path)) == []  # neither eval/base nor the judges' cache


def test_mc1_without_a_true_answer_is_a_data_error(tmp_path):
    from h3fusion.data import load_eval_items

    data, _ = _data_dir_with_mc_label(tmp_path, "mc1_targets", 0)  # its first answer is the true one
    with pytest.raises(DataError, match="'mc1_targets' has 0 answers labelled 1; MC1 needs exactly one"):
        load_eval_items(_smoke(tmp_path, **{"data.dir": str(data)}), "honest")


# ---------------------------------------------------------------------------------------------- 2, 3. adapters vs base

OTHER_BASES = [
    pytest.param(
        {"intermediate_size": 96},
        "layer 0 down_proj has lora_A (4, 96) and lora_B (64, 4), which do not fit the base's down_proj (out 64, in 128)",
        id="shapes",
    ),
    pytest.param({"num_hidden_layers": 4}, "adapts layer 2, but the base model has 2 layers", id="layers"),
]


@pytest.mark.parametrize(("tiny", "expected"), OTHER_BASES)
def test_evaluate_refuses_an_expert_of_another_base_as_fuse_does(tmp_path, capsys, tiny, expected):
    from h3fusion.evaluation.run import evaluate_model
    from h3fusion.fusion import build_raw

    profile = _smoke(tmp_path)
    for task in profile.tasks:
        _fake_expert(profile, task, **tiny)
    before = _written(profile)
    with pytest.raises(ModelError) as fuse_err:
        build_raw(profile)
    with pytest.raises(ModelError) as eval_err:
        evaluate_model(profile, "helpful")
    assert expected in str(eval_err.value) and "retrain the experts on this base" in str(eval_err.value)
    assert str(eval_err.value) == str(fuse_err.value)  # the same check, on the same (first) expert
    code, err = _run(_cli(tmp_path, "evaluate", "--model", "helpful"), capsys)
    assert code == 2 and expected in err
    assert _written(profile) == before  # no eval/, no judges/, no fusion/


def test_baselines_refuse_experts_of_another_base_before_building(tmp_path, capsys):
    profile = _smoke(tmp_path)
    for task in profile.tasks:
        _fake_expert(profile, task, num_hidden_layers=4)
    before = _written(profile)
    code, err = _run(_cli(tmp_path, "baselines", "--only", "ensemble-uniform"), capsys)
    assert code == 2 and "but the base model has 2 layers" in err
    assert _written(profile) == before


# ---------------------------------------------------------------------------------------------- 4. target modules


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        pytest.param(
            "[nonsense_proj]",
            "['nonsense_proj'] name no module of the base model 'tiny-random'; its linear modules are "
            "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']",
            id="unknown",
        ),
        pytest.param(
            "[q_proj]",
            "= ['q_proj'] adapts no FFN projection, so `h3fusion fuse` could not upcycle the experts; include "
            "['gate_proj', 'up_proj', 'down_proj']",
            id="not-ffn",
        ),
    ],
)
def test_align_checks_target_modules_before_training(tmp_path, capsys, targets, expected):
    import yaml

    profile = _smoke(tmp_path, **{"experts.lora.target_modules": yaml.safe_load(targets)})
    with pytest.raises(ConfigError, match="experts.lora.target_modules") as err:
        align(profile, "helpful")
    assert expected in str(err.value)
    argv = _cli(tmp_path, "align", "--set", f"experts.lora.target_modules={targets}")
    code, cli_err = _run(argv, capsys)
    assert code == 2 and expected in cli_err
    assert _written(profile) == []


def test_align_accepts_an_ffn_subset_and_dotted_names(tmp_path):
    from h3fusion.experts import check_target_modules
    from h3fusion.models import load_base

    model, _ = load_base(_smoke(tmp_path))
    for targets in (["down_proj"], ["mlp.gate_proj", "q_proj"]):
        check_target_modules(_smoke(tmp_path, **{"experts.lora.target_modules": targets}), model)


# ---------------------------------------------------------------------------------------------- 5. damaged weights


@pytest.fixture()
def experts_profile(tmp_path: Path) -> Profile:
    profile = _smoke(tmp_path)
    for task in profile.tasks:
        _fake_expert(profile, task)
    return profile


def _expect_damaged(err: str, file: Path, folder: Path, rebuild: str) -> None:
    assert f"{file} is truncated" in err
    assert f": delete the folder {folder} and {rebuild}" in err


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["fuse", "--raw-only"], id="fuse"),
        pytest.param(["evaluate", "--model", "helpful"], id="evaluate-expert"),
        pytest.param(["baselines", "--only", "merge-average"], id="baselines"),
    ],
)
def test_truncated_expert_adapter_is_named_and_nothing_is_written(tmp_path, capsys, experts_profile, command):
    folder = expert_dir(experts_profile, "helpful")
    _truncate(folder / ADAPTER_WEIGHTS)
    before = _written(experts_profile)
    code, err = _run(_cli(tmp_path, *command), capsys)
    assert code == 2
    _expect_damaged(
        err, folder / ADAPTER_WEIGHTS, folder, "re-run `h3fusion align --profile smoke --expert helpful`"
    )
    with pytest.raises(ArtifactError, match="adapter_model.safetensors is truncated"):
        load_expert_adapter_weights(experts_profile, "helpful")
    assert _written(experts_profile) == before  # no fusion/, eval/ or (empty) baselines/ folder


def test_truncated_raw_moe_is_named_by_evaluate_and_load_moe(tmp_path, capsys, experts_profile):
    from h3fusion.fusion import build_raw
    from h3fusion.moe import load_moe

    folder = build_raw(experts_profile, quiet=True)
    weights = next(folder.glob("*.safetensors"))
    _truncate(weights)
    before = _written(experts_profile)
    code, err = _run(_cli(tmp_path, "evaluate", "--model", "raw-moe"), capsys)
    assert code == 2
    _expect_damaged(err, weights, folder, "build it with `h3fusion fuse --profile smoke --raw-only`")
    with pytest.raises(ArtifactError, match="is truncated"):
        load_moe(folder)
    assert _written(experts_profile) == before


def test_truncated_baseline_model_is_named_by_evaluate(tmp_path, capsys, experts_profile):
    from h3fusion.baselines.runner import build_baseline

    folder = build_baseline(experts_profile, "merge-average")
    weights = next(folder.glob("*.safetensors"))
    _truncate(weights)
    before = _written(experts_profile)
    code, err = _run(_cli(tmp_path, "evaluate", "--model", "merge-average"), capsys)
    assert code == 2
    _expect_damaged(err, weights, folder, "run `h3fusion baselines --profile smoke --only merge-average`")
    assert _written(experts_profile) == before


def test_a_failed_atomic_dir_leaves_no_empty_parent(tmp_path):
    final = tmp_path / "runs" / "smoke" / "baselines" / "merge-average"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("builder failed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 6, 7. CLI and profile


def test_set_value_that_is_not_yaml_names_key_value_and_quoting(tmp_path, capsys):
    code, err = _run(_cli(tmp_path, "data", "--set", "data.max_length=[1"), capsys)
    assert code == 2
    assert err.startswith("h3fusion data: error: --set data.max_length: the value '[1' is not valid YAML")
    assert "quote the value to pass it as text: --set \"data.max_length='[1'\"" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ablations.top_ks", [1, 5], "`ablations.top_ks` = [1, 5] has k = [5] outside 1..3"),
        ("ablations.top_ks", [0], "`ablations.top_ks` = [0] has k = [0] outside 1..3"),
        ("fusion.top_k", 5, "`fusion.top_k` = 5 is larger than the number of experts (3"),
    ],
)
def test_top_k_outside_1_to_experts_names_key_value_and_range_only(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as err:
        _smoke(tmp_path, **{key: value})
    msg = str(err.value)
    assert expected in msg and "between 1 and 3" in msg
    assert "'name': 'smoke'" not in msg and "<top level>" not in msg  # not the whole profile


def test_top_ks_error_through_the_cli(tmp_path, capsys):
    code, err = _run(_cli(tmp_path, "data", "--set", "ablations.top_ks=[1,5]"), capsys)
    assert code == 2
    assert err.splitlines() == [
        "h3fusion data: error: invalid profile "
        + str(Path(__file__).resolve().parent.parent / "profiles/smoke.yaml")
        + ":",
        "  - `ablations.top_ks` = [1, 5] has k = [5] outside 1..3 (the number of experts); "
        "use values between 1 and 3, or null for all of them",
    ]
