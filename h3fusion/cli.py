"""The `h3fusion` command: a thin layer over the library, one subcommand per pipeline stage.

Each subcommand imports its module lazily, so `h3fusion --help` is instant. User mistakes
(`H3FusionError`) print one clear message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from h3fusion.errors import H3FusionError


def _parse_set(values: list[str] | None) -> dict[str, Any]:
    """`--set fusion.top_k=1 --set data.max_length=128` -> overrides (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in values or []:
        if "=" not in item:
            raise H3FusionError(f"--set expects KEY=VALUE (e.g. fusion.top_k=1), got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise H3FusionError(
                f"--set {key.strip()}: the value {value!r} is not valid YAML ({problem}); write a list as [1, 2] or "
                f"a mapping as {{a: 1}}, or quote the value to pass it as text: --set \"{key.strip()}='{value}'\""
            ) from None
    return out


def _profile(args: argparse.Namespace):
    from h3fusion.config import load_profile

    return load_profile(args.profile, _parse_set(args.set))


def _call(module: str, function: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(f"h3fusion.{module}"), function)


def cmd_data(args: argparse.Namespace) -> None:
    if args.download or args.from_dir or args.check:
        _offline_data(args)
    else:
        _call("data.report", "print_report")(_profile(args))


def _offline_data(args: argparse.Namespace) -> None:
    """`data --check | --download | --from DIR`: the shipped copies in data/offline/."""
    from pathlib import Path

    from h3fusion.data import offline

    if args.download or args.from_dir:
        from_dir = Path(args.from_dir) if args.from_dir else None
        written = offline.refresh(offline.OFFLINE_DIR, from_dir=from_dir)
        print(f"refreshed {len(written)} files in data/offline/; every checksum matches {offline.CHECKSUMS}")
    problems = offline.verify(offline.OFFLINE_DIR)
    if problems:
        raise H3FusionError(
            "data/offline/ does not match its checksums: " + "; ".join(problems)
            + ". Restore it with `git checkout -- data/offline` or `h3fusion data --download`"
        )
    print(f"data/offline/: {len(offline.recorded_checksums(offline.OFFLINE_DIR))} files, every checksum matches {offline.CHECKSUMS}")


def cmd_align(args: argparse.Namespace) -> None:
    _call("experts", "align")(_profile(args), args.expert)


def cmd_fuse(args: argparse.Namespace) -> None:
    _call("fusion", "fuse")(_profile(args), raw_only=args.raw_only)


def cmd_evaluate(args: argparse.Namespace) -> None:
    metrics = _call("evaluation.run", "evaluate_model")(_profile(args), args.model)
    print(json.dumps(metrics, indent=2))


def cmd_judges(args: argparse.Namespace) -> None:
    _call("evaluation.judges", "print_validation")(_profile(args))


def cmd_baselines(args: argparse.Namespace) -> None:
    _call("baselines", "run_baselines")(_profile(args), only=args.only)


def cmd_run_notebooks(args: argparse.Namespace) -> None:
    run = _call("notebooks", "run_notebooks")
    run(args.profile, only=args.only, output_dir=args.output_dir, overrides=_parse_set(args.set))


def cmd_set_repository(args: argparse.Namespace) -> None:
    if bool(args.url) == args.unset:
        raise H3FusionError("give the URL (https://github.com/OWNER/NAME) or --unset, not both or neither")
    written = _call("repository", "set_repository")(None if args.unset else args.url)
    print(f"rewrote {len(written)} files; the Colab links now point at {args.url or 'nothing (not published)'}")


def cmd_bench(args: argparse.Namespace) -> None:
    _call("bench", "run_bench")(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="h3fusion",
        description="H3Fusion: fuse helpful, harmless and honest LoRA experts into one MoE model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str, profile: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        if profile:
            p.add_argument("--profile", "-p", default="cpu", help="profile name (profiles/NAME.yaml) or path")
            p.add_argument(
                "--set",
                action="append",
                metavar="KEY=VALUE",
                help="override a profile key, e.g. fusion.top_k=1",
            )
        p.set_defaults(func=func)
        return p

    p = add(
        "data",
        cmd_data,
        "print counts per task and split, one example each, and every deviation from the paper",
    )
    shipped = p.add_mutually_exclusive_group()
    shipped.add_argument("--check", action="store_true", help="check the shipped data/offline/ against SHA256SUMS")
    shipped.add_argument(
        "--download",
        action="store_true",
        help="refresh data/offline/ from the pinned GitHub commits and the hub (needs internet), checksums checked",
    )
    shipped.add_argument(
        "--from", dest="from_dir", metavar="DIR", help="refresh data/offline/ from a plain folder of the same layout"
    )
    p = add("align", cmd_align, "stage 1: LoRA-align the profile's experts (by default one per task)")
    p.add_argument(
        "--expert",
        "-e",
        "--task",
        "-t",
        dest="expert",
        default="all",
        help="an expert's name (the default experts are named after their task: helpful, harmless, honest) or all",
    )
    p = add("fuse", cmd_fuse, "upcycle the experts into an MoE and run fusion training (stage 2)")
    p.add_argument("--raw-only", action="store_true", help="only build the raw (untrained) MoE")
    p = add("evaluate", cmd_evaluate, "evaluate one model on the helpful, harmless and honest dimensions")
    p.add_argument("--model", "-m", required=True, help="base, an expert, a fused variant or a baseline")
    add("judges", cmd_judges, "train (or load cached) offline judges and print their validation figures")
    p = add(
        "baselines",
        cmd_baselines,
        "build and evaluate the baselines (merges, ensembles, the data-mix LoRA, H3Fusion-Instruct)",
    )
    p.add_argument("--only", help="build only this baseline")
    p = add(
        "run-notebooks", cmd_run_notebooks, "execute the notebooks with papermill into book/", profile=False
    )
    p.add_argument("--profile", "-p", default="cpu", help="profile name or path")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a profile key in every notebook"
    )
    p.add_argument("--only", action="append", help="notebook number (e.g. 02); repeatable")
    p.add_argument("--output-dir", help="where executed notebooks go (default: book/)")
    p = add(
        "set-repository",
        cmd_set_repository,
        "publish the companion's GitHub URL: book/_config.yml, every Colab link and Colab setup cell",
        profile=False,
    )
    p.add_argument("url", nargs="?", help="https://github.com/OWNER/NAME")
    p.add_argument("--unset", action="store_true", help="back to 'not published' (no links)")
    p = add(
        "bench", cmd_bench, "benchmark the MoE against the dense model (ratios in one process)", profile=False
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes (for CI)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except H3FusionError as err:
        print(f"h3fusion {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
