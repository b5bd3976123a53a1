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

from backbench.report.leaderboard import Leaderboard
from backbench.report import plots
from backbench.report.plots import DPI, OKABE_ITO, RC, style


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


def figures(lb: Leaderboard, cost: dict[str, dict[str, Any]] | None = None,
            formats: tuple[str, ...] = ("svg",)) -> Figures:
    """Every figure the leaderboard supports, encoded in ``formats``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
