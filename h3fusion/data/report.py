"""`h3fusion data`: counts per task and split, one example of each, and every deviation from the paper."""

from __future__ import annotations

import textwrap

from h3fusion.config import Profile, shown_path
from h3fusion.data import sources, splits
from h3fusion.data.template import format_prompt
from h3fusion.dimensions import get_dimension

ALPACA_FULL = 52_002
"""Records of the full Stanford Alpaca data (the paper trains on a 20k cleaned subset of it)."""


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
            print(f"{task:<9}: the first {len(sample):,} of {len(population):,} evaluation items (file order)")
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
    deviations: list[str] = []

    helpful, skipped = splits.helpful_train_all(profile)
    n_alpaca = len(helpful) + skipped
    helpful_eval = splits.helpful_eval_all(profile)
    harmless, harmless_skipped = splits.harmless_train_all(profile)
    bt = splits.beavertails_split(profile)
    honest, empty_answers = splits.honest_train_all(profile)
    tqa_train, tqa_eval, _ = splits.truthfulqa_halves(profile)
    honest_eval, mc_missing = splits.honest_eval_all(profile)
    train_all = {"helpful": helpful, "harmless": harmless, "honest": honest}
    eval_all = {"helpful": helpful_eval, "harmless": splits.harmless_eval_all(profile), "honest": honest_eval}

    _print_eval_samples(profile)
    print(f"{'task':<10}{'train available':>17}{'train used':>12}{'eval available':>16}{'eval used':>11}")
    for task in profile.tasks:
        n_train = min(len(train_all[task]), profile.data.train_examples[task])
        n_eval = min(len(eval_all[task]), profile.data.eval_examples[task])
        print(f"{task:<10}{len(train_all[task]):>17,}{n_train:>12,}{len(eval_all[task]):>16,}{n_eval:>11,}")
    print()
    print(
        f"helpful : Alpaca {n_alpaca:,} records ({skipped} with an empty output skipped); AlpacaEval {len(helpful_eval)} items"
    )
    safe = sum(r["is_safe"] for r in bt.non_eval_rows)
    print(
        f"harmless: BeaverTails eval {len(bt.eval_prompts):,} prompts / {len(bt.eval_rows):,} labelled rows; non_eval "
        f"{len(bt.non_eval_prompts):,} prompts / {len(bt.non_eval_rows):,} labelled rows ({safe:,} safe = training pool; "
        f"{harmless_skipped} empty responses skipped)"
    )
    print(
        f"honest  : TruthfulQA {len(tqa_train)} training questions -> {len(honest):,} examples (one per correct "
        f"answer, {empty_answers} empty answers skipped); {len(tqa_eval)} eval questions, MC1/MC2 targets matched for "
        f"{len(tqa_eval) - len(mc_missing)} ({len(mc_missing)} missing)"
    )
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
            if task == "harmless":
                print(
                    "    note: BeaverTails' is_safe labels come from crowd annotators and are noisy; some pairs "
                    "labelled safe are one-sided or offensive. The paper trains on the labels as given, and so do we.\n"
                )
    _show(
        "helpful: first eval item (prompt + reference)",
        format_prompt(helpful_eval[0]["instruction"]),
        helpful_eval[0]["reference"],
    )
    if eval_all["harmless"]:
        _show("harmless: first eval item (prompt)", format_prompt(eval_all["harmless"][0]["prompt"]), "")
    _show(
        "honest: first eval item (prompt + best answer)",
        format_prompt(honest_eval[0]["question"]),
        honest_eval[0]["best_answer"],
    )
    print()

    if n_alpaca < ALPACA_FULL:
        deviations.append(
            f"helpful training data is a {n_alpaca:,}-record random sample of Alpaca ({sources.SOURCES['alpaca'].local_path}); "
            f"the paper trains on a 20k cleaned subset of the {ALPACA_FULL:,} records (alpaca_small.json, not obtainable)"
        )
    if skipped:
        deviations.append(f"{skipped} Alpaca records with an empty output are skipped")
    if bt.carved:
        deviations.append(
            f"BeaverTails 30k_train (27,186 rows) is missing: 30k_test ({len(bt.eval_rows) + len(bt.non_eval_rows):,} rows, "
            f"{len(bt.eval_prompts) + len(bt.non_eval_prompts):,} prompts) is split by prompt (seed {profile.seed}, eval fraction "
            f"{profile.data.beavertails_eval_fraction}): eval {len(bt.eval_prompts):,} prompts / {len(bt.eval_rows):,} rows, "
            f"non_eval {len(bt.non_eval_prompts):,} prompts / {len(bt.non_eval_rows):,} rows; the harmless expert trains on "
            f"safe non_eval rows, the harmlessness judge on all non_eval rows, and the paper's evaluation on all "
            f"30k_test prompts becomes evaluation on the eval prompts"
        )
    deviations.append(
        "harmless evaluation uses distinct prompts (30k_test repeats prompts with different responses)"
    )
    if empty_answers:
        deviations.append(
            f"{empty_answers} empty TruthfulQA correct answers (trailing ';' in the source) give no example"
        )
    if mc_missing:
        deviations.append(
            f"{len(mc_missing)} TruthfulQA eval questions have no MC1/MC2 targets: {mc_missing[:3]}"
        )
    for task in profile.tasks:
        if profile.data.train_examples[task] < len(train_all[task]):
            deviations.append(
                f"{task}: training capped at {profile.data.train_examples[task]:,} of {len(train_all[task]):,} "
                f"examples (seeded sample, seed {profile.seed})"
            )
    paper_eval = {
        "helpful": f"the paper's first {min(50, len(helpful_eval))} AlpacaEval instructions",
        "harmless": f"all {len(eval_all['harmless']):,} eval prompts (the paper scores every 30k_test prompt)",
        "honest": f"the paper's {len(tqa_eval)} TruthfulQA questions",
    }
    paper_n = {
        "helpful": min(50, len(helpful_eval)),
        "harmless": len(eval_all["harmless"]),
        "honest": len(tqa_eval),
    }
    drawn = "a seeded sample stratified by " if profile.data.eval_sample == "stratified" else "the first "
    for task in profile.tasks:
        used = min(len(eval_all[task]), profile.data.eval_examples[task])
        if used != paper_n[task] or (task == "helpful" and profile.data.eval_sample == "stratified"):
            how = f"{drawn}{get_dimension(task).strata}" if profile.data.eval_sample == "stratified" else drawn.strip()
            deviations.append(f"{task}: evaluation on {used:,} items, {how}, instead of {paper_eval[task]}")
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
