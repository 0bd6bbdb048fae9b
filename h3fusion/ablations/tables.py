"""Tables of ablation runs' scores for the book: one row per run, step or k; routing accuracy with intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ROUTING_MASKS = ("prompt after template", "sequence after template")
"""The routing accuracies the tables show: held-out items of the training sources, on the prompt and on the whole
sequence, both without the template's shared header (`h3fusion.routing` says why)."""
ROUTING_ALL = "routing (prompt) all % ↑"
ROUTING_SEQUENCE = "routing (sequence) all % ↑"


def score_row(scores: Mapping[str, Any]) -> dict[str, float]:
    """One table row of a run's scores: NLL per task, MC1/MC2, and the held-out routing accuracy per task on
    prompts, over all items on prompts and over all items on whole sequences (`ROUTING_MASKS`)."""
    row = {f"NLL {t} ↓": v for t, v in scores["nll"].items()}
    row.update({"MC1 % ↑": scores["mc1"], "MC2 % ↑": scores["mc2"]})
    prompt = scores["routing_accuracy"][ROUTING_MASKS[0]]
    row.update({f"routing (prompt) {t} % ↑": v for t, v in prompt.items() if t != "all"})
    row[ROUTING_ALL] = prompt["all"]
    row[ROUTING_SEQUENCE] = scores["routing_accuracy"][ROUTING_MASKS[1]]["all"]
    return row


def scores_table(runs: Mapping[Any, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows = runs (their keys), columns = `score_row`."""
    import pandas as pd

    return pd.DataFrame(
        [score_row(r["scores"]) for r in runs.values()], index=pd.Index([str(k) for k in runs], name="run")
    )


def nested_scores_table(scores_by_key: Mapping[str, Mapping[str, Any]], index_name: str) -> pd.DataFrame:
    """Rows = keys of a {key: scores} dict (steps, k), columns = `score_row`."""
    import pandas as pd

    return pd.DataFrame(
        [score_row(s) for s in scores_by_key.values()], index=pd.Index(list(scores_by_key), name=index_name)
    )


def router_matrix(scores: Mapping[str, Any]) -> np.ndarray:
    """[tasks, experts] mean router probability (averaged over layers and prompts) of a run's scores."""
    from h3fusion.analysis import task_expert_matrix

    return task_expert_matrix({t: np.asarray(m) for t, m in scores["routing"].items()})


def router_weight_table(runs: Mapping[str, Mapping[str, Any]], expert_names: Sequence[str]) -> pd.DataFrame:
    """Rows (run, task of the prompts), columns = mean router weight of each expert."""
    import pandas as pd

    frames = []
    for name, run in runs.items():
        m = router_matrix(run["scores"])
        tasks = list(run["scores"]["routing"])
        idx = pd.MultiIndex.from_product([[name], [f"{t} prompts" for t in tasks]], names=["run", "prompts"])
        frames.append(pd.DataFrame(m, index=idx, columns=[f"{e} expert" for e in expert_names]))
    return pd.concat(frames)


def router_accuracy_table(runs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (run, tokens), one column per task and all: held-out routing accuracy "% [low, high]" (Wilson)."""
    import pandas as pd

    from h3fusion.routing import wilson

    records = {}
    for name, run in runs.items():
        scores = run["scores"]
        n = scores["routing_items"]
        for mask in ROUTING_MASKS:
            row = {}
            for task, value in scores["routing_accuracy"][mask].items():
                items = sum(n.values()) if task == "all" else n[task]
                low, high = wilson(round(value * items / 100), items)
                row[f"{task} (n={items})"] = f"{value:.1f} [{low:.1f}, {high:.1f}]"
            records[(name, mask)] = row
    return pd.DataFrame.from_dict(records, orient="index").rename_axis(["run", "tokens"])


def sensitivity(
    runs_by_value: Mapping[float, Mapping[str, Any]],
) -> tuple[list[float], dict[str, list[float]], dict[str, list[float]]]:
    """(x, {NLL per task}, {percent metrics}) of a sweep, for `plots.sensitivity_lines`."""
    x = [float(v) for v in runs_by_value]
    rows = [score_row(r["scores"]) for r in runs_by_value.values()]
    nll = {k: [row[k] for row in rows] for k in rows[0] if k.startswith("NLL")}
    pct = {k: [row[k] for row in rows] for k in ("MC1 % ↑", "MC2 % ↑", ROUTING_ALL)}
    return x, nll, pct


def loss_logs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """{run: loss log} of the runs that logged any (for `plots.training_curves`)."""
    return {name: run["loss_log"] for name, run in runs.items() if run.get("loss_log")}
