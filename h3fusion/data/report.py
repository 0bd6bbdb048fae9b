"""`h3fusion data`: counts per task and split, one example of each, and every deviation from the paper."""

from __future__ import annotations

import textwrap

from h3fusion.config import Profile, shown_path
from h3fusion.data import splits
from h3fusion.data.template import format_prompt
from h3fusion.dimensions import get_dimension


def _clip(text: str, width: int = 600) -> str:
    return text if len(text) <= width else text[:width] + f" [... {len(text) - width} more characters]"


def _show(title: str, prompt: str, response: str) -> None:
    print(f"--- {title}")
    print(textwrap.indent(_clip(prompt + response), "    "))


def _print_eval_samples(profile: Profile) -> None:
    """How the evaluation items were drawn, and each stratum's share in the sample against the whole set."""
    from collections import Counter

    for task in profile.tasks:
        population = splits.eval_items_all(profile, task)
        sample = splits.load_eval_items(profile, task)
        if profile.data.eval_sample == "first":
            print(
                f"{task:<9}: the first {len(sample):,} of {len(population):,} evaluation items (file order)"
            )
            continue
        have, of = Counter(i["stratum"] for i in sample), Counter(i["stratum"] for i in population)
        largest = ", ".join(f"{k} {have[k]}/{of[k]}" for k, _ in of.most_common(4))
        print(
            f"{task:<9}: {len(sample):,} of {len(population):,} evaluation items, seeded sample stratified by "
            f"{get_dimension(task).strata} ({len(have)} of {len(of)} strata present; largest: {largest})"
        )
    print()


def print_report(profile: Profile) -> None:
    """Print the data each stage of this profile will use and how it differs from the paper's."""
    where = shown_path(profile.data_dir) if profile.data.source == "local" else "the Hugging Face hub"
    print(f"profile {profile.name!r}: data from {where}; tasks {list(profile.tasks)}; seed {profile.seed}\n")
    dimensions = {t: get_dimension(t) for t in profile.tasks}
    reports = {t: d.source_report(profile) for t, d in dimensions.items()}
    train_all = {t: d.train_pool(profile) for t, d in dimensions.items()}
    eval_all = {t: d.eval_pool(profile) for t, d in dimensions.items()}

    _print_eval_samples(profile)
    print(f"{'task':<10}{'train available':>17}{'train used':>12}{'eval available':>16}{'eval used':>11}")
    for task in profile.tasks:
        n_train = min(len(train_all[task]), profile.data.train_examples[task])
        n_eval = min(len(eval_all[task]), profile.data.eval_examples[task])
        print(f"{task:<10}{len(train_all[task]):>17,}{n_train:>12,}{len(eval_all[task]):>16,}{n_eval:>11,}")
    print()
    for r in reports.values():
        print(r.summary)
    print()

    for task in profile.tasks:
        used = splits.cap(train_all[task], profile.data.train_examples[task], profile.seed, task)
        if used:
            ex = used[0]
            _show(
                f"{task}: first training example used (prompt + response)",
                format_prompt(ex.instruction, ex.input),
                ex.output,
            )
            if reports[task].train_note:
                print(reports[task].train_note)
    for r in reports.values():
        if r.first_eval is not None:
            _show(*r.first_eval)
    print()

    deviations = [d for r in reports.values() for d in r.deviations]
    for task in profile.tasks:
        if profile.data.train_examples[task] < len(train_all[task]):
            deviations.append(
                f"{task}: training capped at {profile.data.train_examples[task]:,} of {len(train_all[task]):,} "
                f"examples (seeded sample, seed {profile.seed})"
            )
    stratified = profile.data.eval_sample == "stratified"
    drawn = "a seeded sample stratified by " if stratified else "the first "
    for task, r in reports.items():
        used = min(len(eval_all[task]), profile.data.eval_examples[task])
        if used != r.paper_n or (r.paper_takes_first and stratified):
            how = f"{drawn}{dimensions[task].strata}" if stratified else drawn.strip()
            deviations.append(f"{task}: evaluation on {used:,} items, {how}, instead of {r.paper_eval}")
    deviations.append(
        "prompt template ends with '### Response:\\n' (one newline; the paper's ends at the colon); prompt and "
        "response are tokenised separately, loss on response tokens + EOS only"
    )
    if profile.fusion.released_code.labels:
        deviations.append(
            "fusion.released_code.labels is ON: mixed-dataset task labels reproduce the released code's "
            "running-total bug (later tasks get earlier tasks' labels)"
        )
    print("Deviations from the paper:")
    for d in deviations:
        print(textwrap.fill(d, width=110, initial_indent="  - ", subsequent_indent="    "))
