"""The `h3fusion` command: help for every subcommand, and user mistakes as one clear line (exit 2)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from h3fusion.cli import build_parser, main
from h3fusion.config import PROFILES_DIR


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_console_script_runs_main_and_reports_mistakes_in_one_line() -> None:
    """The installed `h3fusion` entry point is cli.main, and a fresh process prints a user mistake as one line
    on stderr with exit status 2 (no traceback)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="h3fusion")
    assert script.value == "h3fusion.cli:main"
    res = subprocess.run(
        [sys.executable, "-m", "h3fusion.cli", "evaluate", "--profile", "no-such-profile", "--model", "base"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "unknown profile 'no-such-profile'" in res.stderr


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"h3fusion {command}" in out


def test_expected_subcommands() -> None:
    assert {"data", "align", "fuse", "evaluate", "judges", "baselines", "run-notebooks", "bench"} <= set(
        _subcommands()
    )


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_unknown_profile_lists_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["run-notebooks", "--profile", "no-such-profile"], capsys)
    assert code == 2
    assert "unknown profile 'no-such-profile'" in err
    for known in ("cpu", "paper", "smoke"):
        assert f"'{known}'" in err


def test_unknown_notebook_number(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, err = _run(
        ["run-notebooks", "--profile", "smoke", "--only", "99", "--output-dir", str(tmp_path)], capsys
    )
    assert code == 2
    assert "no notebook matches --only ['99']" in err and "00_data_and_judges" in err
    assert not list(tmp_path.glob("*.ipynb"))


def test_config_error_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["data", "--profile", "smoke", "--set", "fusion.top_k=5"], capsys)
    assert code == 2
    assert err.startswith("h3fusion data: error: invalid profile")
    assert "fusion.top_k" in err or "top_k" in err


def test_unknown_key_in_profile_file(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (PROFILES_DIR / "smoke.yaml").read_text().replace("seed: 42", "seed: 42\nsede: 1")
    bad.write_text(text)
    code, err = _run(["data", "--profile", str(bad)], capsys)
    assert code == 2
    assert "`sede`: unknown key" in err


def test_renamed_key_names_its_new_name(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    old = tmp_path / "old.yaml"
    text = (PROFILES_DIR / "smoke.yaml").read_text()
    old.write_text(text.replace("items: {honest: 6, helpful: 4, harmless: 46}", "honest_questions: 6"))
    code, err = _run(["data", "--profile", str(old)], capsys)
    assert code == 2
    assert "`evaluation.likelihood.honest_questions` was renamed: use `evaluation.likelihood.items.honest`" in err


def test_set_without_equals_sign(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["data", "--profile", "smoke", "--set", "fusion.top_k"], capsys)
    assert code == 2
    assert "--set expects KEY=VALUE" in err
