"""The report's figures, drawn once with matplotlib and saved as SVG (HTML), PNG (300 dpi) or PDF.

One width, one font size and the Okabe–Ito colour-blind-safe palette for every figure; a
backbone keeps its colour and marker in all of them (by rank). Heights grow with the number of
rows, long names wrap, and ``constrained_layout`` keeps labels from overlapping. A figure that
cannot be drawn (too few backbones, no post-hoc tests, no cost) is listed with the reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backbench.report.leaderboard import Leaderboard
from backbench.report.render import AGGREGATE_NAMES, has_intervals, order

WIDTH = 6.5  # inches: a paper's text width; every figure has it
FONT = 9
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 300
RC = {"font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT, "xtick.labelsize": FONT - 1,
      "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1, "font.family": "DejaVu Sans",
      "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "backbench",
      "axes.prop_cycle": None}


@dataclass
class Figure:
    """One drawn figure: its file stem, a one-sentence caption (what it shows, how to read it)
    and its encodings by format (``svg``, ``png``, ``pdf``)."""

    name: str
    caption: str
    data: dict[str, bytes] = field(default_factory=dict)


class Figures(dict):
    """name -> :class:`Figure`, and ``skipped``: name -> why it was not drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}


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


def figures(lb: Leaderboard, cost: dict[str, dict[str, Any]] | None = None,
            formats: tuple[str, ...] = ("svg",)) -> Figures:
    """Every figure the leaderboard supports, encoded in ``formats``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backbench.report import plots

    out = Figures()
    drawers: list[tuple[str, Callable[..., Any]]] = [
        ("aggregate", plots.aggregate), ("task_scores", plots.task_scores), ("zscore_heatmap", plots.zscore_heatmap),
        ("task_correlation", plots.task_correlation), ("critical_difference", plots.critical_difference),
        ("fewshot_curves", plots.fewshot_curves), ("score_vs_cost", plots.score_vs_cost)]
    rc = {**RC, "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO)}
    for name, draw in drawers:
        with plt.rc_context(rc):
            drawn = draw(lb, style(lb), cost=cost or {})
        if isinstance(drawn, str):
            out.skipped[name] = drawn
            continue
        fig, caption = drawn
        out[name] = Figure(name, caption, {f: encode(fig, f) for f in formats})
        plt.close(fig)
    return out


def encode(fig: Any, fmt: str) -> bytes:
    """The figure as ``fmt`` bytes: PNG at 300 dpi; SVG/PDF as vectors with no date in them."""
    buf = io.BytesIO()
    meta = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}.get(fmt)
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta, bbox_inches="tight", pad_inches=0.05)  # no label clipped
    return buf.getvalue()


def write_figures(figs: Figures, folder: str | Path, fmt: str) -> list[Path]:
    """Write each figure's ``fmt`` encoding as ``folder/<name>.<fmt>``; the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, f in figs.items():
        (folder / f"{name}.{fmt}").write_bytes(f.data[fmt])
        paths.append(folder / f"{name}.{fmt}")
    return paths


def write_pngs(figs: Figures, folder: str | Path) -> list[Path]:
    return write_figures(figs, folder, "png")


def score_label(lb: Leaderboard) -> str:
    """The axis label of the ranked aggregate."""
    return AGGREGATE_NAMES[lb.ranked_by] + (" (95 % interval)" if has_intervals(lb) else "")
