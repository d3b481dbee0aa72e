"""One look for every figure and table: a style per method, criterion, strategy and run, and human labels.

Colours come by family from the Okabe–Ito palette (safe for the common colour-vision deficiencies): the
SVD, QR and LU families of decompositions, the pruning criteria, the VTP gates at each ratio, the
equal-budget strategies, the dense model. Within a family, members differ in shade, marker and line
style, so no two series share both colour and marker. Families and human labels are read from the
registries (`registry.DECOMPOSITIONS`, `CRITERIA`), so a new method gets its style with no edit here.
Column names become human labels with units through `label` (figures) and `header` (tables); the
CSVs keep the machine names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from matplotlib.colors import to_hex, to_rgb

from vitprune.registry import CRITERIA, DECOMPOSITIONS, FAMILIES, SITES

# Okabe & Ito (2008), "Color Universal Design"
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
FAMILY_COLOURS = {"SVD": BLUE, "QR": VERMILLION, "LU": GREEN, "criteria": PURPLE, "gates": SKY,
                  "strategies": ORANGE, "other": "#7F7F7F"}
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p")
# where each family starts in MARKERS, so the decomposition families' markers differ too, not only their colours
MARKER_START = {"SVD": 0, "QR": 4, "LU": 9}
DASHES = ("-", "--", "-.", ":")
STRATEGY_ORDER = ("pruning alone", "VTP + SVD", "VTP +", "dense +")


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str
    label: str


def _shade(colour: str, i: int, n: int) -> str:
    """Member i of n of a family: the family colour, darker or lighter (at most 45 % towards black or white)."""
    if n <= 1:
        return colour
    t = -0.45 + 0.9 * i / (n - 1)
    rgb = to_rgb(colour)
    target = (1.0, 1.0, 1.0) if t > 0 else (0.0, 0.0, 0.0)
    return to_hex(tuple(c + abs(t) * (g - c) for c, g in zip(rgb, target)))


def _member(family: str, i: int, n: int, label: str) -> Style:
    marker = MARKERS[(MARKER_START.get(family, 0) + i) % len(MARKERS)]
    return Style(_shade(FAMILY_COLOURS[family], i, n), marker, DASHES[i % len(DASHES)], label)


def _decomposition(method: str) -> Style:
    entry = DECOMPOSITIONS[method]
    family = entry.family if entry.family in FAMILIES else "other"
    members = DECOMPOSITIONS.names(family=entry.family)
    return _member(family, members.index(method), len(members), entry.label)


def _criterion(name: str, ratio: str | None = None) -> Style:
    if name == "gates":
        return Style(SKY, "o", "-", "VTP gates" + (f", {ratio} % pruned" if ratio else ""))
    members = [c for c in CRITERIA.names() if c != "gates"]
    label = CRITERIA[name].label + (" scores" if name != "random" else " scores (floor)")
    return _member("criteria", members.index(name), len(members), label + (f", {ratio} % pruned" if ratio else ""))


def style(name: str) -> Style:
    """The style of a series, whatever figure it is in: a method, a criterion, a model label (dense,
    pruned_<criterion>_<NN>, decomp_<method>[_pays], budget strategies), a run or a site."""
    if name == "dense":
        return Style(BLACK, "o", "-", "dense")
    if name in DECOMPOSITIONS:
        return _decomposition(name)
    if name in CRITERIA:
        return _criterion(name)
    pruned = re.fullmatch(r"pruned_(\w+?)_(\d+(?:p\d+)?)", name)  # names.ratio_label: 40, 05, 40p1
    if pruned and pruned.group(1) in CRITERIA:
        criterion, pct = pruned.group(1), f"{float(pruned.group(2).replace('p', '.')):g}"
        if criterion == "gates":  # the ratios of one method: shades of the gates' colour, darker for more pruning
            return _member("gates", min(int(float(pct)) // 20, 4), 5, f"VTP gates, {pct} % pruned")
        return _criterion(criterion, pct)
    decomposed = re.fullmatch(r"decomp_(\w+?)(_pays)?", name)
    if decomposed and decomposed.group(1) in DECOMPOSITIONS:
        base = _decomposition(decomposed.group(1))
        return base if not decomposed.group(2) else Style(base.colour, base.marker, ":", f"{base.label}, where it pays")
    for i, start in enumerate(STRATEGY_ORDER):
        if name.startswith(start):
            return _member("strategies", i, len(STRATEGY_ORDER), name)
    if name in SITES:
        return _member("other", SITES.names().index(name), len(SITES.names()), SITES[name].label)
    runs = {"sparse (gates + L1)": Style(SKY, "s", "--", "sparse (gates + L1)")}
    return runs.get(name, Style(FAMILY_COLOURS["other"], "o", "-", name))


# ---------------------------------------------------------------- human labels with units

COLUMNS = {
    "top1": "Top-1 before fine-tuning (%)", "top5": "Top-5 before fine-tuning (%)",
    "top1_ft": "Top-1 after fine-tuning (%)", "top5_ft": "Top-5 after fine-tuning (%)",
    "test_top1": "Test top-1 (%)", "train_loss": "Training loss", "epoch": "Epoch",
    "macs_M": "MACs per image (M)", "params_M": "Parameters (M)", "rank_ratio": "Rank / min(in, out)",
    "rel_error": "Relative error ‖W − BA‖ / ‖W‖", "cond": "Condition number κ", "orth_loss": "‖QᵀQ − I‖",
    "realised_ratio": "Gated dims removed (fraction)", "macs_reduction_%": "MACs saved (%)",
    "top1_drop_ft": "Top-1 lost after fine-tuning (points)", "top1_drop_ft_vs_pruned":
    "Top-1 lost vs the fine-tuned pruned model (points)", "speedup_vs_source_x": "Speed-up over its source (×)",
    "faster_than_source": "Faster than its source? (speed claim)", "decompose_time_s": "Decomposition time (s)",
    "layers_factorized": "Projections factorized", "variant": "Model", "method": "Method", "criterion": "Criterion",
    "strategy": "Strategy", "factorized": "Factorized", "budget_ratio": "Pruning ratio matched",
    "matched": "Matched on", "target_params_M": "Target parameters (M)", "target_macs_M": "Target MACs (M)",
    "refit": "Refit", "n": "Seeds (n)", "block": "Block", "site": "Site", "kept": "Dims kept", "of": "Of",
    "heads": "Heads", "qk_head_dim": "Query/key dims per head", "v_head_dim": "Value dims per head",
    "attn_in": "Attention input dims", "mlp_in": "MLP input dims", "mlp_hidden": "MLP hidden dims",
    "ratio": "Pruning ratio", "gate": "|g|", "fraction_kept": "Kept fraction of the dense width",
    "mean_gate": "Mean |g|", "below": "Gates below threshold (%)", "sigma": "σᵢ / σ₁",
    "rank_fraction": "Rank / min(in, out)", "when": "When", "top1_when": "Top-1 (%)",
}


def label(column: str) -> str:
    """A column's human label with its unit (figures): 'latency_bs64_ms' -> 'Latency, batch 64 (ms)'."""
    latency = re.fullmatch(r"latency_bs(\d+)_ms", column)
    if latency:
        return f"Latency, batch {latency.group(1)} (ms)"
    return COLUMNS.get(column, column)


def header(column: str) -> str:
    """A table column's readable header: the figure label, or the criterion's / site's own name where the column is
    one (a table's CSV keeps the machine name)."""
    if column in CRITERIA:
        return CRITERIA[column].label
    return label(column)


def is_machine_name(text: str) -> bool:
    """Whether a label is still a column name rather than words (what no axis label may be)."""
    return text in COLUMNS or bool(re.fullmatch(r"[a-z0-9]+(_[a-z0-9%]+)+", text))
