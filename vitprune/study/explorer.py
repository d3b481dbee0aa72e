"""Notebook 09's interactive view: choose the decomposition methods, their rank ratio, before or after fine-tuning and
the cost axis, over the run's own tables. In JupyterLab it is a small ipywidgets panel that redraws the figure;
where nothing can interact (papermill, `interactive=False`) the same call draws its default view, once.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vitprune.study.figures import plot_accuracy_vs_cost
from vitprune.study.styles import label, style
from vitprune.study.tables import latency_columns

WHEN = {"after fine-tuning": "top1_ft", "before fine-tuning": "top1"}


def explorer_frame(vtp: pd.DataFrame, variants: pd.DataFrame, decomposed: pd.DataFrame,
                   sun: pd.DataFrame) -> pd.DataFrame:
    """Every model the view can show, one row per seed: the pruned ones (no rank) and every uniformly factorized
    one at every rank (accuracy after fine-tuning where it was fine-tuned)."""
    costs = ["macs_M", "params_M", *latency_columns(decomposed)]
    pruned = pd.concat([vtp, variants[variants.criterion != "gates"]], ignore_index=True)
    pruned = pruned.assign(method="pruned", rank_ratio=np.nan)
    uniform = decomposed[decomposed.factorized == "uniform"]
    tuned = sun[sun.factorized == "uniform"][["seed", "label", "top1_ft"]]
    factorized = uniform.merge(tuned, on=["seed", "label"], how="left").assign(variant=lambda f: "decomp_" + f.method)
    columns = ["seed", "variant", "method", "rank_ratio", "top1", "top1_ft", *costs]
    return pd.concat([pruned.reindex(columns=columns), factorized.reindex(columns=columns)], ignore_index=True)


def view(frame: pd.DataFrame, methods: list[str], rank_ratio: float, when: str, cost: str) -> plt.Figure:
    """The figure of one choice: the pruned models and the chosen methods at `rank_ratio`, accuracy `when`."""
    acc = WHEN[when]
    chosen = frame[(frame.method == "pruned") | (frame.method.isin(methods) & np.isclose(frame.rank_ratio,
                                                                                       rank_ratio))]
    points = chosen.dropna(subset=[acc, cost]).groupby("variant", sort=False).agg(
        **{cost: (cost, "mean"), acc: (acc, "mean"), f"{acc}_std": (acc, "std")}).reset_index()
    if points.empty:
        fig, ax = plt.subplots()
        ax.text(0.5, 0.5, f"Nothing measured for this choice ({when}, rank {rank_ratio:g})", ha="center")
        ax.set(xlabel=label(cost), ylabel=label(acc))
        return fig
    return plot_accuracy_vs_cost(points, cost, acc)


def explorer(frame: pd.DataFrame, finetune_ratio: float, interactive: bool = True) -> Any:
    """The ipywidgets panel (JupyterLab), or the default view drawn once where nothing can interact."""
    methods = [m for m in dict.fromkeys(frame.method) if m != "pruned"]
    ranks = sorted(frame.rank_ratio.dropna().unique())
    costs = [c for c in ("macs_M", "params_M", *latency_columns(frame)) if frame[c].notna().any()]
    default = dict(methods=methods, rank_ratio=finetune_ratio, when="after fine-tuning", cost=costs[0])
    if not interactive:
        fig = view(frame, **default)
        plt.close(fig)  # shown once, as the cell's result
        return fig
    import ipywidgets as w
    from IPython.display import display

    controls = {"methods": w.SelectMultiple(options=[(style(m).label, m) for m in methods], value=methods, rows=6,
                                            description="Methods"),
                "rank_ratio": w.Dropdown(options=ranks, value=finetune_ratio, description="Rank ratio"),
                "when": w.ToggleButtons(options=list(WHEN), value="after fine-tuning"),
                "cost": w.Dropdown(options=[(label(c), c) for c in costs], value=costs[0], description="Cost")}
    out = w.Output()

    def redraw(change: Any = None) -> None:
        out.clear_output(wait=True)
        with out:
            fig = view(frame, list(controls["methods"].value), controls["rank_ratio"].value, controls["when"].value,
                       controls["cost"].value)
            display(fig)
            plt.close(fig)

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([controls["methods"], w.VBox([controls["rank_ratio"], controls["cost"]])]),
                   controls["when"], out])
