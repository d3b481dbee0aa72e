"""Figures and tables: one plot style, PNG + PDF, tables as Markdown, CSV and LaTeX; nothing else.

The notebooks draw with the `plot_*` functions and write through their `Stage` (see `stage`), which
stages files and publishes them into figures/<set>/ with one author per file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from vitprune.checkpoint import atomic_write
from vitprune.registry import SITES

TIMING_WORDS = ("latency", "time", "speedup", "faster")  # measured columns, excluded from reproducibility checks


# ---------------------------------------------------------------- style

def use_style() -> None:
    """The one plot style of every figure."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight", "figure.figsize": (6, 4),
                         "pdf.fonttype": 42, "axes.titleweight": "bold"})


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.pdf atomically (PDF without a creation date, so reruns match)."""
    paths = []
    for ext, meta in ((".png", {"Software": None}), (".pdf", {"CreationDate": None, "Producer": None})):
        path = stem.with_suffix(ext)
        atomic_write(path, lambda tmp, ext=ext, meta=meta: fig.savefig(tmp, format=ext[1:], metadata=meta))
        paths.append(path)
    return paths


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def save_table(df: pd.DataFrame, stem: Path, per_seed: pd.DataFrame | None = None) -> list[Path]:
    """Write `stem`.md and .tex of `df`, and `stem`.csv of `per_seed` (one row per seed) or else of `df`, atomically."""
    csv = df if per_seed is None else per_seed
    writers = {".md": lambda tmp: Path(tmp).write_text(markdown_table(df)),
               ".csv": lambda tmp: csv.to_csv(tmp, index=False, float_format="%.6g"),
               ".tex": lambda tmp: Path(tmp).write_text(df.to_latex(index=False, float_format="%.4g", escape=True))}
    paths = []
    for ext, write in writers.items():
        atomic_write(stem.with_suffix(ext), write)
        paths.append(stem.with_suffix(ext))
    return paths


def reproducible_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The table without measured-time columns (latency, durations), which differ run to run."""
    measured = [c for c in df.columns if any(w in c.lower() for w in TIMING_WORDS) or c.endswith(("_ms", "_s"))]
    return df.drop(columns=measured)


# ---------------------------------------------------------------- plots

def plot_training_curves(histories: dict[str, list[list[dict]]]) -> plt.Figure:
    """Test top-1 and training loss per epoch for each named run: the mean over seeds, the band ±1 std."""
    rows = [{"run": label, "seed": i, "epoch": r["epoch"], "test_top1": r.get("test_top1", np.nan),
             "train_loss": r["train_loss"]}
            for label, runs in histories.items() for i, hist in enumerate(runs) for r in hist]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if rows:
        df = pd.DataFrame(rows)
        sns.lineplot(data=df, x="epoch", y="test_top1", hue="run", errorbar="sd", ax=ax1)
        sns.lineplot(data=df, x="epoch", y="train_loss", hue="run", errorbar="sd", ax=ax2, legend=False)
        ax1.legend(fontsize=8)
    n = max((len(runs) for runs in histories.values()), default=0)
    ax1.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"Accuracy (mean ± std, {n} seeds)")
    ax2.set(xlabel="epoch", ylabel="training loss", title="Loss (incl. L1 term when sparse)")
    return fig


def plot_sparsity(history: list[dict]) -> plt.Figure:
    """Sparsity emerging during sparse training: mean |g| and the fraction of gates below thresholds."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [r["epoch"] for r in history]
    sites = sorted({k.split("/")[1] for r in history for k in r if k.startswith("gate_mean/")} - {"all"})
    for site in ["all", *sites]:
        ax1.plot(ep, [r[f"gate_mean/{site}"] for r in history], label=site, lw=2.5 if site == "all" else 1.2)
    thresholds = sorted({k.split("/")[0][len("gate_below_"):] for r in history for k in r
                         if k.startswith("gate_below_")}, key=float)
    for t in thresholds:
        ax2.plot(ep, [100 * r[f"gate_below_{t}/all"] for r in history], label=f"|g| < {t}")
    ax1.set(xlabel="epoch", ylabel="mean |g|", title="Gate magnitude")
    ax2.set(xlabel="epoch", ylabel="% of gates", title="Gates below threshold")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return fig


def plot_score_distributions(scores: dict[tuple[int, str], Any]) -> plt.Figure:
    """Histogram of gate scores per block (rows) and site (columns)."""
    blocks = sorted({b for b, _ in scores})
    sites = [s for s in SITES.names() if any(k[1] == s for k in scores)]
    fig, axes = plt.subplots(len(blocks), len(sites), figsize=(2.6 * len(sites), 1.7 * len(blocks)),
                             sharex=True, squeeze=False)
    top = max(float(v.max()) for v in scores.values())
    bins = np.linspace(0, max(top, 1e-6), 30)
    for i, b in enumerate(blocks):
        for j, s in enumerate(sites):
            ax = axes[i, j]
            ax.hist(np.asarray(scores[(b, s)]), bins=bins, color=sns.color_palette()[j % 10])
            if i == 0:
                ax.set_title(s, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"block {b}")
    fig.supxlabel("|g|")
    fig.tight_layout()
    return fig


def plot_kept_dims(archs: dict[str, list[dict[str, int]]], dense: list[dict[str, int]]) -> plt.Figure:
    """Kept width per block and site for each pruned model (fraction of the dense width)."""
    cols = list(SITES.names(default=True))
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.4), sharey=True)
    for ax, col in zip(axes, cols):
        for label, arch in archs.items():
            ax.plot([r["block"] for r in arch], [_width(r, col) / _width(d, col) for r, d in zip(arch, dense)],
                    marker="o", label=label)
        ax.set(title=col, xlabel="block", ylim=(0, 1.05))
    axes[0].set_ylabel("kept fraction")
    axes[-1].legend(fontsize=8)
    return fig


def _width(row: dict[str, int], col: str) -> int:
    return row["heads"] * row["v_head_dim"] if col == "attn_out" else row[col]


def plot_spectra(spectra: dict[str, np.ndarray]) -> plt.Figure:
    """Normalised singular values of each layer type (one line per layer)."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name in spectra})
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, s in spectra.items():
            if name.endswith("." + kind):
                ax.semilogy(np.arange(1, len(s) + 1) / len(s), s / s[0], label=name.split(".")[1], alpha=0.8)
        ax.set(title=kind, xlabel="rank / min(in, out)")
    axes[0, 0].set_ylabel("sigma_i / sigma_1")
    axes[0, -1].legend(title="block", fontsize=7)
    return fig


def plot_lines(df: pd.DataFrame, x: str, y: str, hue: str, title: str, logx: bool = False,
               logy: bool = False) -> plt.Figure:
    """One line per `hue` value; where `df` holds several seeds per point, the mean with a ±1 std band."""
    fig, ax = plt.subplots()
    sns.lineplot(data=df, x=x, y=y, hue=hue, style=hue, markers=True, dashes=False, errorbar="sd", ax=ax)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    return fig


def plot_mean_curves(df: pd.DataFrame, x: str, y: str, hue: str, group: str, title: str) -> plt.Figure:
    """One curve per `hue`: per `group` the mean of x and y over seeds, ±1 std of y as error bars."""
    summary = df.groupby([hue, group], sort=False).agg(x=(x, "mean"), y=(y, "mean"), y_std=(y, "std")).reset_index()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in summary.groupby(hue, sort=False):
        curve = curve.sort_values("x")
        ax.errorbar(curve["x"], curve["y"], yerr=curve["y_std"].fillna(0.0), marker="o", capsize=3, label=name)
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_bars(df: pd.DataFrame, x: str, y: str, hue: str, title: str) -> plt.Figure:
    """Grouped bars of the mean over seeds with ±1 std error bars, and each seed as a dot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=df, x=x, y=y, hue=hue, errorbar="sd", capsize=0.1, ax=ax)
    sns.stripplot(data=df, x=x, y=y, hue=hue, dodge=True, palette=dict.fromkeys(df[hue].unique(), "black"), size=3,
                  legend=False, ax=ax)
    low = df[y].min()
    ax.set_ylim(max(0.0, low - 2 * (df[y].max() - low + 0.5)), None)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
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


def plot_accuracy_vs_cost(df: pd.DataFrame, cost: str, acc: str = "top1_ft", label: str = "variant",
                          family: str = "family") -> plt.Figure:
    """Mean accuracy against a cost column for every variant, ±1 std over seeds as error bars (where `df` has
    `<acc>_std`), with the Pareto front of the means."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = dict(zip(df[family].unique(), sns.color_palette()))
    for name, group in df.groupby(family, sort=False):
        ax.errorbar(group[cost], group[acc], yerr=group.get(f"{acc}_std"), fmt="o", ms=6, capsize=3,
                    color=palette[name], label=name)
    front = pareto_front(df[cost].tolist(), df[acc].tolist())
    pts = df.iloc[front]
    ax.plot(pts[cost], pts[acc], "k--", lw=1, label="Pareto front")
    for _, row in pts.iterrows():
        ax.annotate(str(row[label]), (row[cost], row[acc]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=cost, ylabel=acc, title=f"Accuracy vs {cost} (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


# ---------------------------------------------------------------- REPORT.md

def report_markdown(name: str, sections: list[dict[str, Any]], tables: dict[str, str], params_yaml: str,
                    environment: dict[str, Any], findings: str = "", split: str = "") -> str:
    """REPORT.md of a parameter set: the checked findings; per stage its summary, figures (with captions) and
    tables; then the parameter set, the environment and the timings. `sections` are stage records; `tables`
    maps a table name to its Markdown."""
    lines = [f"# Report: `{name}`", "",
             f"Regenerated by `vitprune reproduce params/{name}.yaml`. Each figure and table below is written by "
             "the notebook named in its section (`MANIFEST.json`); the executed notebooks are in "
             f"`runs/{name}/notebooks/` and rendered as HTML in `runs/{name}/report/index.html`.", ""]
    if split:
        lines += [split, ""]
    if findings:
        lines += ["## Findings", "", findings.strip(), "", "([JSON](findings.json))", ""]
    for record in sections:
        lines += [f"## {record['stage'][:2]} · {record['stage'][3:].replace('_', ' ')}", ""]
        if record.get("summary"):
            lines += [record["summary"], ""]
        for item, caption in record.get("captions", {}).items():
            if item in tables:
                lines += [f"**{item}** — {caption} ([CSV]({item}.csv), [LaTeX]({item}.tex))", "", tables[item], ""]
            else:
                lines += [f"![{caption}]({item}.png)", "", f"*{item}* — {caption} ([PDF]({item}.pdf))", ""]
    lines += ["## Parameter set", "", "```yaml", params_yaml.rstrip(), "```", "", "## Environment", "",
              markdown_table(pd.DataFrame({"what": list(environment), "value": [str(v) for v in
                                                                               environment.values()]})),
              "## Timings", "", markdown_table(pd.DataFrame(
                  [{"stage": r["stage"], "seconds": r.get("seconds", float("nan"))} for r in sections]))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- README blocks

def readme_block(key: str) -> tuple[str, str]:
    """The HTML comments that fence a generated block of the README."""
    return f"<!-- generated:{key}:start -->", f"<!-- generated:{key}:end -->"


def replace_block(text: str, key: str, content: str) -> str | None:
    """`text` with the block fenced for `key` replaced by `content`; None if the text has no such block."""
    start, end = readme_block(key)
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def results_block(fig_dir: Path, summary: str, timing: dict[str, Any] | None = None) -> str:
    """The README's results for a parameter set: the generated summary, the time each stage took (from the last
    run that executed them all), the checked findings, the headline tables and figure."""
    parts = [f"*Generated by `vitprune reproduce` from `{fig_dir.as_posix()}/` (see its `REPORT.md`); do not edit "
             "by hand.*", "", summary, ""]
    if timing:
        stages = ", ".join(f"{name[:2]} {entry['seconds']:.0f} s" for name, entry in timing["stages"].items()
                           if "seconds" in entry)
        parts += [f"Time of the last full run, from scratch after install: {timing['total_seconds']:.0f} s "
                  f"({stages}; `pipeline_timing.json` in the run folder).", ""]
    findings = fig_dir / "findings.md"
    if findings.is_file():
        parts += ["**Findings** (`findings.md`, `findings.json`)", "", findings.read_text().strip(), ""]
    figure = fig_dir / "accuracy_vs_macs.png"
    if figure.is_file():
        parts += [f"![accuracy vs MACs]({figure.as_posix()})", ""]
    for name, title in (("table_vtp", "Table VTP"), ("table_ablation_scores", "Ablation"), ("table_sun", "Table Sun"),
                        ("table_equal_budget_finetuned", "Equal parameters")):
        table = fig_dir / f"{name}.md"
        if table.is_file():
            parts += [f"**{title}** (`{name}.md`, mean ± std over seeds; per-seed values in `{name}.csv`)", "",
                      table.read_text().strip(), ""]
    return "\n".join(parts)
