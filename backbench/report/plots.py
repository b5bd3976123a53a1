"""One function per report figure: ``(leaderboard, styles, cost=) -> (figure, caption)``, or a
sentence saying why the figure cannot be drawn. Called by :func:`backbench.report.figures.figures`
inside its style context (size, font, palette)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from backbench.report.leaderboard import Leaderboard, main_metrics
from backbench.report.render import AGGREGATE_NAMES, has_intervals, order, spearman_note

WIDTH = 6.5  # inches: a paper's text width; every figure has it
FONT = 9
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 300
RC = {"font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT, "xtick.labelsize": FONT - 1,
      "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1, "font.family": "DejaVu Sans",
      "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "backbench",
      "axes.prop_cycle": None}


def wrap(name: str, width: int = 22) -> str:
    """A long name broken after its separators (``:/@_-.``) into lines of at most ``width``
    characters, so a label never runs into the next panel or label."""
    import re

    lines, cur = [], ""
    for piece in re.split(r"(?<=[:/@_\-. ])", name):
        while len(piece) > width:  # a token longer than a line: cut it
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(piece[:width])
            piece = piece[width:]
        if cur and len(cur) + len(piece) > width:
            lines.append(cur)
            cur = ""
        cur += piece
    return "\n".join(ln.strip() for ln in [*lines, cur] if ln.strip())


def row_height(labels: list[str]) -> float:
    """Inches per row for labels of this many lines: rows never overlap."""
    n = max((lb.count("\n") + 1 for lb in labels), default=1)
    return max(0.27, 0.15 * n + 0.08)


def style(lb: Leaderboard) -> dict[str, tuple[str, str]]:
    """backbone -> (colour, marker), by rank: the same in every figure."""
    return {lb.backbones[i]: (OKABE_ITO[k % 8], MARKERS[(k // 8) % 8]) for k, i in enumerate(order(lb))}


def score_label(lb: Leaderboard) -> str:
    """The axis label of the ranked aggregate."""
    return AGGREGATE_NAMES[lb.ranked_by] + (" (95 % interval)" if has_intervals(lb) else "")


Drawn = "tuple[Any, str] | str"
Styles = dict[str, tuple[str, str]]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def score_of(lb: Leaderboard, i: int) -> tuple[float, float | None, float | None]:
    """Backbone ``i``'s ranked aggregate and its interval (None without intervals)."""
    st, b = lb.stats, lb.backbones[i]
    if st is not None and b in st.aggregates.get(lb.ranked_by, {}):
        iv = st.aggregates[lb.ranked_by][b]
        return (iv.value, iv.low, iv.high) if has_intervals(lb) else (iv.value, None, None)
    return float(lb.aggregate[i]), None, None


def _point(ax: Any, x: float, y: float, lo: float | None, hi: float | None, style: tuple[str, str],
           filled: bool = True, horizontal: bool = True) -> None:
    """A marker with its interval as whiskers (horizontal: along x)."""
    colour, marker = style
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        err = [[max(x - lo, 0)], [max(hi - x, 0)]] if horizontal else [[max(y - lo, 0)], [max(hi - y, 0)]]
        ax.errorbar(x, y, xerr=err if horizontal else None, yerr=None if horizontal else err, fmt="none",
                    ecolor=colour, elinewidth=1.2, capsize=3)
    ax.plot(x, y, marker=marker, color=colour, mfc=colour if filled else "white", ms=6.5, ls="none", mew=1.4)


def aggregate(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    idx = [i for i in order(lb) if np.isfinite(score_of(lb, i)[0])]
    if not idx:
        return "no backbone has an aggregate yet"
    plt = _plt()
    labels = [wrap(f"#{lb.rank[i]} {lb.backbones[i]}", 30) for i in idx]
    fig, ax = plt.subplots(figsize=(WIDTH, row_height(labels) * len(idx) + 1.2), layout="constrained")
    st = lb.stats
    for y, i in enumerate(idx):
        v, lo, hi = score_of(lb, i)
        tied = st is None or lb.backbones[i] in st.tied_with_first
        _point(ax, v, y, lo, hi, styles[lb.backbones[i]], filled=tied)
    ax.set_yticks(range(len(idx)), labels)
    ax.invert_yaxis()
    if lb.ranked_by == "zmean":
        ax.axvline(0, color="0.6", lw=0.8, zorder=0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(score_label(lb))
    how = AGGREGATE_NAMES[lb.ranked_by]
    caption = (f"Each backbone's {how}, best at the top, with its 95 % bootstrap interval as whiskers; "
               f"filled markers are not separable from #1, hollow ones are." if has_intervals(lb) else
               f"Each backbone's {how}, best at the top (no intervals: the records keep no per-sample outcomes "
               f"or --bootstrap 0).")
    return fig, caption


def task_scores(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    if not lb.columns:
        return "no task results yet"
    plt = _plt()
    from matplotlib.transforms import blended_transform_factory

    idx, metric = order(lb), main_metrics()
    k = len(lb.columns)
    ncols = min(3, k)
    nrows = math.ceil(k / ncols)
    labels = [wrap(lb.backbones[i], 24) for i in idx]
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, nrows * (row_height(labels) * len(idx) + 1.1)), sharey=True,
                             layout="constrained", squeeze=False)
    for j, c in enumerate(lb.columns):
        ax = axes.flat[j]
        text = blended_transform_factory(ax.transAxes, ax.transData)
        for y, i in enumerate(idx):
            b = lb.backbones[i]
            v = lb.values[i, j]
            if not np.isfinite(v):
                ax.text(0.5, y, "n/a" if (b, c) in lb.na else "–", transform=text, ha="center", va="center",
                        color="0.4", fontsize=FONT - 1)
                continue
            iv = lb.stats.cells.get((b, c)) if lb.stats is not None else None
            _point(ax, v, y, iv.low if iv else None, iv.high if iv else None, styles[b])
        task = c.split(":", 1)[0]
        ax.set_title(wrap(c, 20 if ncols == 3 else 32), fontsize=FONT - 0.5)
        ax.set_xlabel(metric.get(task, "value"))
        ax.grid(axis="x", alpha=0.3)
        ax.locator_params(axis="x", nbins=4)
        ax.margins(x=0.1)
    for ax in axes.flat[k:]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(range(len(idx)), labels)
    axes[0, 0].set_ylim(len(idx) - 0.5, -0.5)
    return fig, ("One panel per task:dataset: each backbone's main metric (marker) with its 95 % bootstrap "
                 "interval (whiskers), backbones in leaderboard order; each panel has its own x axis, so "
                 "compare backbones within a panel; – marks a missing cell, n/a a task that does not apply.")


def _heatmap(ax: Any, M: np.ndarray, vlim: float, fmt: str) -> Any:
    """A diverging, colour-blind-safe heatmap (RdBu) with its values written in the cells."""
    import matplotlib

    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#e5e5e5")
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=-vlim, vmax=vlim, aspect="auto")
    for (r, c), v in np.ndenumerate(M):
        ax.text(c, r, "–" if not np.isfinite(v) else format(v, fmt), ha="center", va="center", fontsize=FONT - 1,
                color="white" if np.isfinite(v) and abs(v) > 0.6 * vlim else "black")
    ax.spines[:].set_visible(False)
    return im


def zscore_heatmap(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    if not lb.tasks or len(lb.backbones) < 2:
        return "z-scores need at least two backbones"
    plt = _plt()
    idx = order(lb)
    labels = [wrap(lb.backbones[i], 30) for i in idx]
    fig, ax = plt.subplots(figsize=(WIDTH, row_height(labels) * len(idx) + 1.6), layout="constrained")
    im = _heatmap(ax, lb.task_z[idx], 2.0, "+.2f")
    ax.set_xticks(range(len(lb.tasks)), lb.tasks, rotation=30 if len(lb.tasks) > 5 else 0,
                  ha="right" if len(lb.tasks) > 5 else "center")
    ax.set_yticks(range(len(idx)), labels)
    fig.colorbar(im, ax=ax, label="z-score", shrink=0.9)
    return fig, ("Each backbone's z-score per task (rows in leaderboard order): blue above the backbones' mean, "
                 "red below, in standard deviations; grey – marks a task without a z-score for that backbone.")


def task_correlation(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    note = spearman_note(lb)
    if note:
        return note
    plt = _plt()
    T = len(lb.tasks)
    fig, ax = plt.subplots(figsize=(WIDTH, min(WIDTH * 0.75, 0.4 * T + 1.4)), layout="constrained")
    M = lb.spearman.copy()
    np.fill_diagonal(M, 1.0)
    im = _heatmap(ax, M, 1.0, "+.2f")
    ax.set_aspect("equal")  # square cells: a task against a task
    ax.set_xticks(range(T), lb.tasks, rotation=30 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T), lb.tasks)
    fig.colorbar(im, ax=ax, label="Spearman ρ", shrink=0.9)
    return fig, ("Spearman rank correlation between tasks across backbones: blue (+1) where two tasks order the "
                 "backbones alike, red (−1) where they reverse it, so a task whose row is pale ranks backbones "
                 "its own way and one task's ranking does not settle another's.")


def critical_difference(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    st = lb.stats
    if st is None or st.posthoc is None or len(st.mean_ranks) < 2:
        return ("the critical-difference diagram needs the Wilcoxon-Holm post-hoc tests: at least 2 backbones "
                "and 2 (task, dataset) blocks every backbone has, and scikit-posthocs (pip install "
                "'backbench[stats]')")
    import pandas as pd
    import scikit_posthocs as sp

    plt = _plt()
    names = lb.backbones
    labels = {b: wrap(b, 26) for b in names}
    ranks = pd.Series({labels[b]: st.mean_ranks[b] for b in names})
    sig = pd.DataFrame(st.posthoc, index=[labels[b] for b in names], columns=[labels[b] for b in names])
    # no constrained layout: the labels sit outside the axes on purpose (saving trims to them)
    fig, ax = plt.subplots(figsize=(WIDTH, 0.3 * len(names) + 1.3))
    longest = max(len(line) for b in names for line in labels[b].splitlines()) + 6  # + " (1.5)"
    side = min(0.42, (longest * (FONT - 1) * 0.6 / 72 + 0.15) / WIDTH)  # the labels' width, as a fraction
    fig.subplots_adjust(left=side, right=1 - side, top=0.8, bottom=0.05)
    sp.critical_difference_diagram(ranks, sig, ax=ax, label_props={"fontsize": FONT - 1},
                                   color_palette={labels[b]: styles[b][0] for b in names},
                                   crossbar_props={"color": "0.2", "linewidth": 2.5})
    ax.set_title("mean rank over (task, dataset) blocks (1 = best)", fontsize=FONT)
    return fig, ("Each backbone's mean rank over the (task, dataset) blocks (1 = best); backbones joined by a "
                 "horizontal bar are not significantly different (Wilcoxon signed-rank tests, Holm-corrected, "
                 "α = 0.05; Demšar 2006).")


def fewshot_curves(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    if not lb.fewshot:
        return "no few-shot results"
    from matplotlib.ticker import NullLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6), layout="constrained")
    bands = lb.stats.fewshot if lb.stats is not None else {}
    shots = sorted({k for c in lb.fewshot.values() for k in c})
    banded = False
    for b in [lb.backbones[i] for i in order(lb) if lb.backbones[i] in lb.fewshot]:
        curve = lb.fewshot[b]
        x = sorted(curve)
        colour, marker = styles[b]
        ax.plot(x, [curve[k] for k in x], marker=marker, color=colour, label=wrap(b, 40), ms=5)
        lo, hi = _band(bands.get(b, {}), x, curve)
        if lo is not None:
            ax.fill_between(x, lo, hi, color=colour, alpha=0.18, lw=0)
            banded = True
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(shots[0] / 1.3, shots[-1] * 1.3)
    ax.set_xlabel("shots per class (log scale)")
    ax.set_ylabel("few-shot top-1\n(mean over datasets and seeds)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(3, len(lb.fewshot)), frameon=False)
    band = ("the band is the 95 % bootstrap interval over seeds × samples (mean ± std over seeds where no "
            "outcomes are kept)" if banded else "no band: one seed and no per-sample outcomes")
    return fig, f"Few-shot linear-probe accuracy against the number of labelled images per class; {band}."


def _band(bands: dict[int, Any], x: list[int], curve: dict[int, float]) -> tuple[Any, Any]:
    """(low, high) per shot: the bootstrap interval, else mean ± std over seeds, else (None, None)."""
    if all(k in bands and bands[k].low is not None for k in x):
        return [bands[k].low for k in x], [bands[k].high for k in x]
    if all(k in bands and bands[k].std is not None for k in x):
        return [curve[k] - bands[k].std for k in x], [curve[k] + bands[k].std for k in x]
    return None, None


def score_vs_cost(lb: Leaderboard, styles: Styles, cost: Any = None) -> Drawn:
    cost = cost or {}
    keys = [(k, label) for k, label in (("n_params", "parameters"), ("gflops", "forward GFLOPs per image"))
            if any((cost.get(b) or {}).get(k) for b in lb.backbones)]
    if not keys or not lb.tasks:
        return "no backbone's cache records its parameter count or GFLOPs"
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(WIDTH, 3.4), sharey=True, layout="constrained", squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for i in order(lb):
            b = lb.backbones[i]
            x = (cost.get(b) or {}).get(key)
            v, lo, hi = score_of(lb, i)
            if x and np.isfinite(v):
                _point(ax, float(x), v, lo, hi, styles[b], horizontal=False)
                ax.plot([], [], marker=styles[b][1], color=styles[b][0], ls="none", label=wrap(b, 40))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(EngFormatter(sep="") if key == "n_params" else FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} (log scale)")
        ax.margins(x=0.15, y=0.1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(wrap(score_label(lb), 34))
    if lb.ranked_by == "rank":  # a mean rank: 1 is best, so up is better as on the other aggregates
        axes[0, 0].invert_yaxis()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), frameon=False)
    what = " and against forward GFLOPs per image" if len(keys) == 2 else ""
    return fig, (f"The ranked score ({AGGREGATE_NAMES[lb.ranked_by]}) against parameters{what}, log x axes; "
                 f"higher and further left is better: more score for less cost.")
