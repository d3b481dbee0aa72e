"""The helpers every stage's generated prose uses: percentages, means over seeds, the summary notebook's name.

Each stage module writes its own "What this shows" paragraph (`conclusion`) from its run's numbers, so the
text is true for whatever parameter set ran; nothing is typed from a particular run.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from vitprune.study.stages import STAGES
from vitprune.study.stats import with_spread

__all__ = ["mean", "means", "pct", "summary_notebook", "with_spread"]


def pct(x: float) -> str:
    return f"{x:.1f} %"


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def means(long: pd.DataFrame, key: str) -> pd.DataFrame:
    """Mean over seeds of every numeric column, one row per `key` (first-seen order)."""
    return long.groupby(key, sort=False).mean(numeric_only=True).reset_index()


def summary_notebook() -> str:
    """The number of the notebook that checks the claims (the registered summary stage), e.g. '09'."""
    return STAGES.summary_stage().name.split("_", 1)[0]
