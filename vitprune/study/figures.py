"""The study's figures: every series in its one style (`styles.style`), every axis in words with units, every point
told apart — points at one x are dodged, curves that coincide are named in a note — sized for a paper's
one or two columns. `audit` records what a drawn figure shows (labels, series, legend) for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from vitprune.registry import SITES
from vitprune.study.styles import BLACK, label, style

COLUMN, DOUBLE = 3.5, 7.2  # inches: one and two columns of a paper


def use_style() -> None:
    """The one plot style of every figure: one font family, TrueType fonts embedded in PDFs, 200 dpi PNGs."""
    plt.rcdefaults()
    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 8.5, "axes.titleweight": "bold",
        "axes.labelsize": 8, "legend.fontsize": 6.5, "legend.title_fontsize": 7, "xtick.labelsize": 7,
        "ytick.labelsize": 7, "axes.grid": True, "grid.color": "#E0E0E0", "grid.linewidth": 0.6,
        "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.3, "lines.markersize": 4.5,
        "figure.dpi": 150, "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42,
        "figure.figsize": (COLUMN, 2.6)})


def _band(ax, frame: pd.DataFrame, x: str, y: str, name: str) -> np.ndarray:
    """Mean of y over seeds per x as a line with markers in `name`'s style, with a ±1 std band (seaborn); the
    means."""
    s = style(name)
    sns.lineplot(data=frame, x=x, y=y, errorbar="sd", color=s.colour, marker=s.marker, linestyle=s.linestyle,
                 markeredgecolor=s.colour, label=s.label, ax=ax)
    return frame.groupby(x)[y].mean().values


def _coinciding(curves: dict[str, np.ndarray]) -> list[list[str]]:
    """Groups of series whose curves (of three points or more: fewer can agree by chance) are the same to float
    precision: they are drawn one on top of another."""
    groups: list[list[str]] = []
    for name, values in curves.items():
        if len(values) < 3:
            continue
        for group in groups:
            if np.allclose(curves[group[0]], values, rtol=1e-6, atol=1e-9, equal_nan=True):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def _note_coinciding(ax, curves: dict[str, np.ndarray]) -> None:
    notes = [", ".join(style(n).label for n in group) for group in _coinciding(curves)]
    if notes:
        ax.text(0.0, -0.2, "Drawn on top of one another (the same values): " + "; ".join(notes) + ".",
                transform=ax.transAxes, fontsize=6, va="top", ha="left", wrap=True)


def plot_lines(df: pd.DataFrame, x: str, y: str, hue: str, title: str, logx: bool = False,
               logy: bool = False) -> plt.Figure:
    """One line per `hue` value in its style; where `df` holds several seeds per point, the mean with a ±1 std band.
    Series whose curves coincide are named in a note."""
    fig, ax = plt.subplots(figsize=(COLUMN, 2.8))
    curves = {name: _band(ax, group, x, y, name) for name, group in df.groupby(hue, sort=False)}
    ax.set(xscale="log" if logx else "linear", yscale="log" if logy else "linear", xlabel=label(x), ylabel=label(y),
           title=title)
    ax.legend(title=label(hue), loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _note_coinciding(ax, curves)
    return fig


def plot_training_curves(histories: dict[str, list[list[dict]]]) -> plt.Figure:
    """Test top-1 and training loss per epoch for each named run: the mean over seeds, the band ±1 std (epochs
    without a test evaluation are left out of the accuracy curve)."""
    rows = [{"run": name, "seed": i, "epoch": r["epoch"], "test_top1": r.get("test_top1", np.nan),
             "train_loss": r["train_loss"]} for name, runs in histories.items() for i, h in enumerate(runs) for r in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(DOUBLE, 2.6))
    frame = pd.DataFrame(rows)
    for name in histories:
        runs = frame[frame.run == name]
        _band(ax1, runs.dropna(subset=["test_top1"]), "epoch", "test_top1", name)
        _band(ax2, runs, "epoch", "train_loss", name)
    n = max((len(runs) for runs in histories.values()), default=0)
    ax1.set(xlabel=label("epoch"), ylabel=label("test_top1"), title=f"Accuracy (mean ± std, {n} seeds)")
    ax2.set(xlabel=label("epoch"), ylabel=label("train_loss"), title="Loss (with the L1 term when sparse)")
    ax1.legend(loc="lower right")
    if ax2.get_legend():
        ax2.get_legend().remove()  # one legend for the two panels
    return fig


def plot_sparsity(history: list[dict]) -> plt.Figure:
    """Sparsity emerging during sparse training: mean |g| per site, and the share of gates below thresholds."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(DOUBLE, 2.6))
    epochs = [r["epoch"] for r in history]
    sites = [s for s in SITES.names() if any(f"gate_mean/{s}" in r for r in history)]
    ax1.plot(epochs, [r["gate_mean/all"] for r in history], color=BLACK, marker="o", lw=2.2, label="all sites")
    for site in sites:
        s = style(site)
        ax1.plot(epochs, [r[f"gate_mean/{site}"] for r in history], color=s.colour, marker=s.marker,
                 linestyle=s.linestyle, label=s.label)
    thresholds = sorted({k.split("/")[0][len("gate_below_"):] for r in history for k in r
                         if k.startswith("gate_below_")}, key=float)
    for i, t in enumerate(thresholds):
        s = style(["dense", "pruned_gates_40", "pruned_magnitude_40"][i % 3])
        ax2.plot(epochs, [100 * r[f"gate_below_{t}/all"] for r in history], color=s.colour, marker=s.marker,
                 linestyle=s.linestyle, label=f"|g| < {t}")
    ax1.set(xlabel=label("epoch"), ylabel=label("mean_gate"), title="Gate magnitude per site")
    ax2.set(xlabel=label("epoch"), ylabel=label("below"), title="Gates near zero")
    ax1.legend(loc="best")
    ax2.legend(loc="best")
    return fig


def plot_score_distributions(scores: dict[tuple[int, str], Any]) -> plt.Figure:
    """Histogram of gate scores per block (rows) and site (columns)."""
    blocks = sorted({b for b, _ in scores})
    sites = [s for s in SITES.names() if any(k[1] == s for k in scores)]
    fig, axes = plt.subplots(len(blocks), len(sites), figsize=(DOUBLE, 1.0 + 1.0 * len(blocks)), sharex=True,
                             squeeze=False)
    bins = np.linspace(0, max(max(float(v.max()) for v in scores.values()), 1e-6), 30)
    for i, b in enumerate(blocks):
        for j, site in enumerate(sites):
            ax = axes[i, j]
            ax.hist(np.asarray(scores[(b, site)]), bins=bins, color=style(site).colour)
            ax.set(title=SITES[site].label if i == 0 else "", ylabel=f"Block {b}: dims" if j == 0 else "",
                   xlabel="Learned gate |g|" if i == len(blocks) - 1 else "")
    fig.tight_layout()
    return fig


def plot_kept_dims(archs: dict[str, list[dict[str, int]]], dense: list[dict[str, int]]) -> plt.Figure:
    """Kept width per block and site for each pruned model ({variant name: its widths}), as a fraction of the
    dense width."""
    columns = {"attn_in": "attn_in", "qk": "qk_head_dim", "attn_out": "v_head_dim", "mlp_in": "mlp_in",
               "mlp_hidden": "mlp_hidden"}
    fig, axes = plt.subplots(1, len(columns), figsize=(DOUBLE, 2.2), sharey=True)
    for ax, (site, column) in zip(axes, columns.items()):
        for variant, arch in archs.items():
            s = style(variant)
            ax.plot([r["block"] for r in arch], [r[column] / d[column] for r, d in zip(arch, dense)], color=s.colour,
                    marker=s.marker, linestyle=s.linestyle, label=s.label)
        ax.set(title=SITES[site].label, xlabel=label("block"), ylim=(0, 1.05))
    axes[0].set_ylabel(label("fraction_kept"))
    axes[-1].legend(loc="lower right")
    return fig


def plot_spectra(spectra: dict[str, np.ndarray]) -> plt.Figure:
    """Normalised singular values of each layer type (one line per block)."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name in spectra})
    fig, axes = plt.subplots(1, len(kinds), figsize=(DOUBLE, 2.3), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        layers = [n for n in spectra if n.endswith("." + kind)]
        for i, name in enumerate(layers):
            s = spectra[name]
            colour = plt.get_cmap("viridis")(i / max(1, len(layers) - 1) * 0.85)
            ax.semilogy(np.arange(1, len(s) + 1) / len(s), s / s[0], color=colour, marker="os^Dv<>P"[i % 8],
                        markevery=max(1, len(s) // 6), label=f"block {name.split('.')[1]}")
        ax.set(title=kind, xlabel=label("rank_fraction"))
    axes[0, 0].set_ylabel(label("sigma"))
    axes[0, -1].legend(loc="lower left")
    return fig


def plot_mean_curves(df: pd.DataFrame, x: str, y: str, hue: str, group: str, title: str) -> plt.Figure:
    """One curve per `hue`: per `group` the mean of x and y over seeds, ±1 std of y as error bars."""
    summary = df.groupby([hue, group], sort=False).agg(x=(x, "mean"), y=(y, "mean"), y_std=(y, "std")).reset_index()
    fig, ax = plt.subplots(figsize=(COLUMN, 2.8))
    for name, curve in summary.groupby(hue, sort=False):
        s, curve = style(name), curve.sort_values("x")
        ax.errorbar(curve["x"], curve["y"], yerr=curve["y_std"].fillna(0.0), color=s.colour, marker=s.marker,
                    linestyle=s.linestyle, capsize=2, label=s.label)
    ax.set(xlabel=label(x), ylabel=label(y), title=title)
    ax.legend(loc="lower right")
    return fig


def plot_bars(df: pd.DataFrame, x: str, y: str, hue: str, title: str) -> plt.Figure:
    """Bars of the mean over seeds (±1 std) per `x` in its style, one hatched and one solid per `hue` (before and
    after fine-tuning), and each seed as a black dot."""
    categories, whens = list(dict.fromkeys(df[x])), list(dict.fromkeys(df[hue]))
    fig, ax = plt.subplots(figsize=(COLUMN + 0.4 * len(categories), 2.8))
    width = 0.8 / len(whens)
    for j, when in enumerate(whens):
        at = df[df[hue] == when]
        means, stds = at.groupby(x)[y].mean(), at.groupby(x)[y].std().fillna(0.0)
        positions = np.arange(len(categories)) + (j - (len(whens) - 1) / 2) * width
        ax.bar(positions, [means.get(c, np.nan) for c in categories], width * 0.95,
               yerr=[stds.get(c, 0.0) for c in categories], capsize=2, label=when,
               color=[style(c).colour for c in categories], hatch="///" if j == 0 else None,
               alpha=0.55 if j == 0 else 1.0, edgecolor="white")
        for pos, c in zip(positions, categories):
            seeds = at[at[x] == c][y]
            ax.plot(np.full(len(seeds), pos), seeds, "o", color=BLACK, ms=2.5)
    ax.set_xticks(range(len(categories)), [style(c).label for c in categories], rotation=20, ha="right")
    low = df[y].min()
    ax.set(ylim=(max(0.0, low - 2 * (df[y].max() - low + 0.5)), None), xlabel=label(x), ylabel=label(y), title=title)
    ax.legend(loc="lower right")
    return fig


def pareto_front(cost: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both lower cost and higher accuracy (by cost)."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -accuracy[i]))
    front, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def dodge(values: Sequence[float], spread: float) -> np.ndarray:
    """Offsets that spread points sharing (to 1e-6) the same value over ±spread/2, leaving the rest at 0."""
    values = np.asarray(values, dtype=float)
    offsets = np.zeros(len(values))
    for v in np.unique(np.round(values, 6)):
        same = np.flatnonzero(np.isclose(values, v, rtol=1e-6))
        if len(same) > 1:
            offsets[same] = np.linspace(-spread / 2, spread / 2, len(same))
    return offsets


def plot_accuracy_vs_cost(df: pd.DataFrame, cost: str, acc: str = "top1_ft", name: str = "variant") -> plt.Figure:
    """Mean accuracy against a cost for every model in its own style, ±1 std over seeds as error bars; models at
    the same cost are dodged sideways (the note says so); the Pareto front of the means as a dashed line."""
    df = df.dropna(subset=[cost, acc]).reset_index(drop=True)  # a model not measured here is not a point
    fig, ax = plt.subplots(figsize=(DOUBLE, 3.2))
    span = float(df[cost].max() - df[cost].min()) or 1.0
    x = df[cost].to_numpy() + dodge(df[cost].tolist(), 0.06 * span)
    for (_, row), at in zip(df.iterrows(), x):
        s = style(row[name])
        ax.errorbar(at, row[acc], yerr=row.get(f"{acc}_std"), color=s.colour, marker=s.marker, linestyle="none",
                    capsize=2, ms=5, label=s.label)
    front = pareto_front(df[cost].tolist(), df[acc].tolist())
    ax.plot(x[front], df[acc].iloc[front], "--", color=BLACK, lw=0.9, label="Pareto front (of the means)")
    ax.set(xlabel=label(cost), ylabel=label(acc), title=f"{label(acc).split(' (')[0]} against "
           f"{label(cost).split(' (')[0]} (mean ± std over seeds)")
    if (x != df[cost].to_numpy()).any():
        ax.text(0.01, 0.01, "Models at the same cost are spread sideways to be told apart.", transform=ax.transAxes,
                fontsize=6, va="bottom")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, ncol=1 + len(df) // 18)
    return fig


# ---------------------------------------------------------------- what a figure shows (for the tests)

def audit(fig: plt.Figure) -> list[dict[str, Any]]:
    """Per axes of a drawn figure: its axis labels and title, every labelled series (colour, marker, line style)
    and the legend's entries with whether a drawn series of that label exists."""
    out = []
    for ax in fig.axes:
        series = []
        for line in ax.get_lines():
            if not line.get_label().startswith("_") and line.get_visible():
                series.append({"label": line.get_label(), "colour": to_hex(line.get_color()),
                               "marker": str(line.get_marker()), "linestyle": str(line.get_linestyle())})
        for container in ax.containers:
            if container.get_label().startswith("_"):
                continue
            if isinstance(container, ErrorbarContainer):
                line = container.lines[0]
                series.append({"label": container.get_label(), "colour": to_hex(line.get_color()),
                               "marker": str(line.get_marker()), "linestyle": str(line.get_linestyle())})
            else:  # bars: one colour per category; told apart by their hatch
                series.append({"label": container.get_label(), "colour": "per category",
                               "marker": f"hatch:{container.patches[0].get_hatch()}", "linestyle": "-"})
        legend = ax.get_legend()
        entries = [t.get_text() for t in legend.get_texts()] if legend else []
        drawn = {s["label"] for s in series} | {c.get_label() for c in ax.collections}
        out.append({"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "title": ax.get_title(),
                    "has_data": bool(series or ax.patches or ax.collections or ax.images), "series": series,
                    "legend": [{"label": e, "drawn": e in drawn} for e in entries]})
    return out
