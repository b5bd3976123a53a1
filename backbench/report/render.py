"""Leaderboard output as text: markdown, CSV and JSON, plus the number formats every renderer shares.

Every format carries the same numbers as :meth:`Leaderboard.to_dict`: a cell's value and its
95 % interval (``value ± half width`` in markdown, ``ci_low``/``ci_high`` columns in CSV), a
backbone's rank with its rank interval and its aggregate with its interval. A missing cell is
``–`` and a cell whose task does not apply is ``n/a``, never blank (CSV: empty and ``n/a``).
The HTML page (:mod:`backbench.report.html`), LaTeX tables (:mod:`backbench.report.latex`) and
figures (:mod:`backbench.report.figures`) live beside this module; they are re-exported here.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np

from backbench.report.leaderboard import Leaderboard

FORMATS = ("markdown", "csv", "json", "html", "latex")
DIGITS = 3  # raw metrics (accuracies, AUROC, mAP): 0.812
Z_DIGITS = 2  # z-scores and their aggregate: +0.52
MISSING, NA = "–", "n/a"
Z_SENTENCE = ("z: the backbone's metric minus the column's mean over backbones, divided by their std "
              "(population); a task's z is the mean over its datasets; BoB's aggregate is the mean over tasks.")
AGGREGATE_NAMES = {"zmean": "mean z-score (BoB)", "rank": "mean rank (1 = best)",
                   "iqm": "IQM of min-max normalised scores"}
AGGREGATE_COLUMN = {"zmean": "z_mean", "rank": "mean_rank", "iqm": "iqm"}


# --------------------------------------------------------------------------- shared formats
def order(lb: Leaderboard) -> list[int]:
    """Backbone indices, best first."""
    return [int(i) for i in np.argsort(lb.rank, kind="stable")]


def has_intervals(lb: Leaderboard) -> bool:
    """Whether any cell has a bootstrap interval (else aggregate intervals are degenerate)."""
    return lb.stats is not None and any(v.low is not None for v in lb.stats.cells.values())


def pm(value: float | None, half: float | None, digits: int, *, sign: bool = False, ci: bool = True) -> str:
    """``0.812 ± 0.021``; ``0.812 ± n/a`` where intervals exist elsewhere but not here (``ci``);
    ``–`` for no value."""
    if value is None or not np.isfinite(value):
        return MISSING
    value = round(value, digits) + 0.0  # no "-0.00"
    v = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    if half is not None and np.isfinite(half):
        return f"{v} ± {half:.{digits}f}"
    return f"{v} ± {NA}" if ci else v


def cell(lb: Leaderboard, i: int, j: int, digits: int = DIGITS) -> str:
    """One raw-metric cell as text: ``value ± half width``, ``n/a`` or ``–``."""
    b, c = lb.backbones[i], lb.columns[j]
    if (b, c) in lb.na:
        return NA
    iv = lb.stats.cells.get((b, c)) if lb.stats is not None else None
    return pm(lb.values[i, j], iv.half_width if iv else None, digits, ci=lb.stats is not None)


def aggregate_text(lb: Leaderboard, i: int, how: str | None = None) -> str:
    """Backbone ``i``'s aggregate ``how`` (default: the ranked one) with its interval."""
    how = how or lb.ranked_by
    digits = Z_DIGITS if how in ("zmean", "rank") else DIGITS
    b = lb.backbones[i]
    if lb.stats is None or b not in lb.stats.aggregates.get(how, {}):
        value = float(lb.aggregate[i]) if how == "zmean" else None
        return pm(value, None, digits, sign=how == "zmean", ci=False)
    iv = lb.stats.aggregates[how][b]
    half = iv.half_width if has_intervals(lb) else None
    return pm(iv.value, half, digits, sign=how == "zmean", ci=True)


def rank_interval(lb: Leaderboard, i: int) -> str:
    """``1–2`` (95 % of bootstrap leaderboards rank it there), ``n/a`` without intervals."""
    b = lb.backbones[i]
    if lb.stats is None or b not in lb.stats.rank or not has_intervals(lb):
        return NA
    _, low, high = lb.stats.rank[b]
    return f"{low}" if low == high else f"{low}–{high}"


def tied_with_first(lb: Leaderboard, i: int) -> str:
    """``#1`` for the leader, ``yes``/``no`` for "not separable from #1", ``n/a`` without intervals."""
    if lb.rank[i] == 1:
        return "#1"
    if lb.stats is None or not has_intervals(lb):
        return NA
    return "yes" if lb.backbones[i] in lb.stats.tied_with_first else "no"


def number(v: Any, digits: int = DIGITS, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return MISSING
    v = round(v, digits) + 0.0  # no "-0.00"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def spearman_note(lb: Leaderboard) -> str | None:
    """Why the task correlation table says nothing, or None when it can."""
    if len(lb.backbones) < 3:
        return (f"the Spearman correlation between tasks needs at least 3 backbones to rank (here "
                f"{len(lb.backbones)}): with fewer it is undefined, so the table shows none.")
    if len(lb.tasks) < 2:
        return "the Spearman correlation between tasks needs at least 2 tasks."
    return None


def spearman_cell(lb: Leaderboard, a: int, b: int) -> str:
    return "+1.00" if a == b else number(float(lb.spearman[a, b]), 2, sign=True)


def leaderboard_rows(lb: Leaderboard) -> list[dict[str, str]]:
    """The ranked table as text cells, best first: what markdown, the terminal and HTML show."""
    col = AGGREGATE_COLUMN[lb.ranked_by]
    rows = []
    for i in order(lb):
        row = {"rank": str(int(lb.rank[i])), "rank 95%": rank_interval(lb, i), "backbone": lb.backbones[i],
               col: aggregate_text(lb, i), "≈ #1": tied_with_first(lb, i),
               "tasks": f"{lb.covered(i)}/{len(lb.tasks)}"}
        row.update({f"z:{t}": number(float(lb.task_z[i, k]), Z_DIGITS, sign=True) for k, t in enumerate(lb.tasks)})
        rows.append(row)
    return rows


def metric_rows(lb: Leaderboard) -> list[dict[str, str]]:
    """Raw metric per task:dataset, ``value ± half width``, best backbone first."""
    return [{"backbone": lb.backbones[i], **{c: cell(lb, i, j) for j, c in enumerate(lb.columns)}} for i in order(lb)]


def statistics_lines(lb: Leaderboard) -> list[str]:
    """Plain sentences: what the intervals are, stability, Friedman, statistics notes."""
    st = lb.stats
    if st is None:
        return ["no intervals (--bootstrap 0)."]
    out = [f"intervals: 95 % percentile bootstrap, {st.bootstrap} paired resamples (seed {st.seed}); ranked by "
           f"{AGGREGATE_NAMES[st.aggregate]}; rank 95%: the range of ranks over bootstrap leaderboards; "
           f"≈ #1: not separable from #1 (the interval of the aggregate's difference to #1 contains 0)."]
    if st.stability.get("sentence"):
        out.append(f"stability (leave one task out): {st.stability['sentence']}.")
    out.append(f"Friedman test: {friedman_text(st.friedman)}.")
    out += [f"statistics note: {n}" for n in st.notes]
    return out


def friedman_text(f: dict[str, Any] | None) -> str:
    if not f:
        return "not run"
    if "note" in f:
        return f["note"]
    return (f"χ² = {f['statistic']:.2f}, p = {f['pvalue']:.3g} over {f['blocks']} (task, dataset) blocks and "
            f"{f['backbones']} backbones (Wilcoxon signed-rank post-hoc, Holm-corrected)")


# --------------------------------------------------------------------------- markdown
def _md_table(rows: list[dict[str, str]]) -> list[str]:
    cols = list(rows[0])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows)]


def to_markdown(lb: Leaderboard) -> str:
    """The leaderboard, the raw metrics with intervals, notes, statistics and task correlations."""
    if not lb.backbones:
        return "_no results yet: run `backbench battle` or a probe first_\n"
    out = _md_table(leaderboard_rows(lb)) + ["", Z_SENTENCE, ""]
    out += ["Main metric per task:dataset (value ± half width of its 95 % interval):", ""]
    out += _md_table(metric_rows(lb))
    if lb.notes():  # which cells are missing, under the table they are missing from
        out += ["", *(f"Note: {n}" for n in lb.notes())]
    out += ["", *statistics_lines(lb)]
    if has_intervals(lb) and len(lb.backbones) > 1 and lb.stats.prob_beats.size:
        out += ["", "P(row ranks above column) over the bootstrap leaderboards:", ""]
        out += _md_table(pairwise_rows(lb))
    if len(lb.tasks) > 1:
        out += ["", "Spearman rank correlation between tasks (across backbones):", ""]
        note = spearman_note(lb)
        if note:
            out.append(f"Note: {note}")
        else:
            out += _md_table([{"task": t, **{u: spearman_cell(lb, a, b) for b, u in enumerate(lb.tasks)}}
                              for a, t in enumerate(lb.tasks)])
    return "\n".join(out) + "\n"


def pairwise_rows(lb: Leaderboard) -> list[dict[str, str]]:
    """P(a ranks above b), rows and columns in rank order; the diagonal is ``–``."""
    idx = order(lb)
    P = lb.stats.prob_beats
    return [{"P(row > column)": lb.backbones[a], **{lb.backbones[b]: number(float(P[a, b]), 2) for b in idx}}
            for a in idx]


# --------------------------------------------------------------------------- CSV and JSON
def csv_rows(lb: Leaderboard) -> list[dict[str, Any]]:
    """One row per backbone, best first (a wide table: ``pandas.read_csv(..., index_col="backbone")``).

    Columns: ``rank``, ``backbone``, ``rank_low``, ``rank_high``, ``z_mean`` with ``z_mean_ci_low``/
    ``z_mean_ci_high`` (and the ranked aggregate likewise when it is not z_mean), ``tasks``,
    ``z:<task>``, then per task:dataset its value and ``<task:dataset> ci_low``/``ci_high``, and
    ``missing``. Empty: missing or no interval; ``n/a``: the task does not apply.
    """
    from backbench.report.leaderboard import _num

    st = lb.stats
    out = []
    for row in lb.rows():
        b = row["backbone"]
        r: dict[str, Any] = {"rank": row["rank"], "backbone": b}
        r["rank_low"], r["rank_high"] = (st.rank[b][1:] if st is not None and b in st.rank else (None, None))
        for how in dict.fromkeys(("zmean", lb.ranked_by)):
            name = AGGREGATE_COLUMN[how]
            iv = st.aggregates.get(how, {}).get(b) if st is not None else None
            r[name] = _num(iv.value) if iv is not None else row.get(name)
            r[f"{name}_ci_low"], r[f"{name}_ci_high"] = (_num(iv.low), _num(iv.high)) if iv is not None else (None, None)
        r["tasks"] = row["tasks"]
        r.update({k: v for k, v in row.items() if k.startswith("z:")})
        for c in lb.columns:
            iv = st.cells.get((b, c)) if st is not None else None
            r[c] = row[c]
            r[f"{c} ci_low"], r[f"{c} ci_high"] = (_num(iv.low), _num(iv.high)) if iv is not None else (None, None)
        r["missing"] = row["missing"]
        out.append(r)
    return out


def to_csv(lb: Leaderboard) -> str:
    rows = csv_rows(lb)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def to_json(lb: Leaderboard) -> str:
    return json.dumps(lb.to_dict(), indent=2, default=_plain)


def _plain(v: Any) -> Any:
    """numpy scalars in the statistics (e.g. stability's τ) as JSON numbers."""
    return v.item() if hasattr(v, "item") else str(v)


def __getattr__(name: str) -> Any:
    """The figure, HTML and LaTeX renderers, importable from here as before (loaded on use)."""
    from importlib import import_module

    where = {"figures": "figures", "write_figures": "figures", "write_pngs": "figures", "Figure": "figures",
             "to_html": "html", "to_latex": "latex"}
    if name in where:
        return getattr(import_module(f"backbench.report.{where[name]}"), name)
    raise AttributeError(name)
