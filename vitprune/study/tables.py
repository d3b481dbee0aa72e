"""Per-seed frames as the tables show them: accuracy as mean ± std over seeds (n), the other columns as means.

The stage modules build their paper tables from their records' frames (`records.table_frame`); the
helpers here join fine-tuned accuracy onto them and summarise across seeds.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vitprune.study.stats import seed_summary, spread_columns

ACCURACY_COLUMNS = ("top1", "top5")  # columns shown as mean ± std; the others as means


def summary_table(long: pd.DataFrame, keys: list[str], sort_by: str | None = None) -> pd.DataFrame:
    """The per-seed frame as one row per `keys`: accuracy columns as 'mean ± std', other numbers as means,
    and n (seeds); sorted by the mean of `sort_by`, highest first, where given."""
    summary = seed_summary(long, keys)
    if sort_by:
        summary = summary.sort_values(sort_by, ascending=False, kind="stable")
    return spread_columns(summary, [c for c in summary.columns
                                    if c.startswith(ACCURACY_COLUMNS) and not c.endswith("_std")])


def with_finetuned(tuned: pd.DataFrame, df: pd.DataFrame, key: str = "variant") -> pd.DataFrame:
    """`df` plus top1_ft/top5_ft of the same seed and model (its `label`) from the fine-tuning results."""
    ft = tuned[["seed", "label", "top1", "top5"]].rename(columns={"top1": "top1_ft", "top5": "top5_ft"})
    return df.merge(ft, on=["seed", "label"], how="left")


def before_after(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """top1 and top1_ft of a per-seed frame as one `top1_when` column with `when` = before / after fine-tuning."""
    named = frame[["seed", key, "top1", "top1_ft"]].rename(columns={"top1": "before fine-tuning",
                                                                   "top1_ft": "after fine-tuning"})
    return named.melt(id_vars=["seed", key], var_name="when", value_name="top1_when")


def latency_columns(frame: pd.DataFrame | dict[str, Any]) -> list[str]:
    """The measured-latency columns of a frame or a measured model's columns, in batch-size order."""
    return [c for c in frame if str(c).startswith("latency")]


def without_internals(frame: pd.DataFrame) -> pd.DataFrame:
    """A per-seed frame as a notebook shows it: without the label and file columns that link it to its models."""
    return frame.drop(columns=[c for c in ("label", "model") if c in frame])
