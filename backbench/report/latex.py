"""LaTeX tables for a paper (``\\input`` them; they need ``\\usepackage{booktabs,graphicx}``):
the leaderboard and one table per task, booktabs rules, the best value of each column in bold
and the values not separable from it underlined.

Separability: on the leaderboard's ranked aggregate, the statistics' "not separable from #1"
(the interval of the paired difference to #1 contains 0). Per task:dataset column, the
statistics' per-column paired test where it has one (``Statistics.column_ties``: column ->
backbones whose paired-difference interval to the column's best contains 0), else the
overlap rule: a value is underlined when its 95 % interval overlaps the best's (the caption
says which rule was used; overlap is the more conservative of the two).
"""

from __future__ import annotations

import re

import numpy as np

from backbench.report import render as R
from backbench.report.leaderboard import Leaderboard, main_metrics

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_SPECIAL_RE = re.compile("|".join(re.escape(k) for k in _SPECIAL))
WIDE = 7  # columns beyond which a table is scaled to the text width


def escape(text: str) -> str:
    """``text`` safe in LaTeX's text mode (``_``, ``#``, ``%``, ``&``, ``$``, braces, ``~``, ``^``, ``\\``)."""
    return _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group()], str(text))


def value(v: float | None, half: float | None, digits: int, *, bold: bool = False, under: bool = False,
          sign: bool = False) -> str:
    """One number with its ± half width (small), bold and/or underlined."""
    if v is None or not np.isfinite(v):
        return "--"
    v = round(v, digits) + 0.0  # no "-0.00"
    s = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    s = s.replace("-", "$-$").replace("+", "$+$")
    if bold:
        s = rf"\textbf{{{s}}}"
    if under:
        s = rf"\underline{{{s}}}"
    if half is not None and np.isfinite(half):
        s += rf"{{\scriptsize$\,\pm\,${half:.{digits}f}}}"
    return s


def tabular(header: list[str], rows: list[list[str]], caption: str, label: str, align: str) -> str:
    """A booktabs table float; scaled to the text width when wide."""
    body = [" & ".join(header) + r" \\", r"\midrule", *(" & ".join(r) + r" \\" for r in rows)]
    inner = "\n".join([rf"\begin{{tabular}}{{{align}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}"])
    if len(header) > WIDE:
        inner = r"\resizebox{\linewidth}{!}{%" + "\n" + inner + "}"
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", inner, rf"\caption{{{caption}}}",
                      rf"\label{{{label}}}", r"\end{table}", ""])


def leaderboard_table(lb: Leaderboard) -> str:
    """Rank (interval), backbone, the ranked aggregate with its interval, z per task."""
    st, idx, how = lb.stats, R.order(lb), lb.ranked_by
    intervals = R.has_intervals(lb)
    digits = R.Z_DIGITS if how in ("zmean", "rank") else R.DIGITS
    zbest = [np.nanmax(lb.task_z[:, k]) if np.isfinite(lb.task_z[:, k]).any() else np.nan for k in range(len(lb.tasks))]
    rows = []
    for i in idx:
        b = lb.backbones[i]
        iv = st.aggregates[how][b] if st is not None and b in st.aggregates.get(how, {}) else None
        agg = iv.value if iv is not None else float(lb.aggregate[i])
        rank = str(lb.rank[i]) + (rf" {{\scriptsize({R.rank_interval(lb, i)})}}".replace("–", "--")
                                  if intervals else "")
        tied = intervals and st is not None and b in st.tied_with_first and lb.rank[i] != 1
        row = [rank, escape(b), value(agg, iv.half_width if iv is not None and intervals else None, digits,
                                      bold=lb.rank[i] == 1, under=tied, sign=how == "zmean")]
        row += [value(float(z), None, R.Z_DIGITS, bold=bool(np.isfinite(z) and z == zbest[k]), sign=True)
                for k, z in enumerate(lb.task_z[i])]
        rows.append(row)
    header = ["Rank", "Backbone", escape(R.AGGREGATE_NAMES[how]), *(rf"$z$: {escape(t)}" for t in lb.tasks)]
    why = (r"rank in parentheses: its 95\,\% bootstrap interval; \underline{underlined}: not separable from "
           r"\#1 (the 95\,\% interval of the paired difference of the aggregate contains 0). " if intervals else "")
    caption = (rf"Leaderboard ranked by {escape(R.AGGREGATE_NAMES[how])}. {why}$z$: a backbone's metric minus "
               r"the mean over backbones, divided by their standard deviation, averaged over a task's datasets; "
               r"best per column in \textbf{bold}.")
    return tabular(header, rows, caption, "tab:backbench-leaderboard", "rl" + "r" * (len(header) - 2))


def _ties(lb: Leaderboard, j: int, best: int) -> tuple[set[str], str]:
    """Backbones not separable from column ``j``'s best, and the rule used."""
    st, c = lb.stats, lb.columns[j]
    col = getattr(st, "column_ties", None) if st is not None else None
    if col is not None and c in col:
        return set(col[c]), "paired"
    if st is None:
        return set(), "none"
    top = st.cells.get((lb.backbones[best], c))
    if top is None or top.low is None:
        return set(), "none"
    out = {b for b in lb.backbones for iv in [st.cells.get((b, c))]
           if iv is not None and iv.low is not None and iv.high >= top.low and iv.low <= top.high}
    return out, "overlap"


def task_table(lb: Leaderboard, task: str) -> str:
    """One task: a column per dataset, a row per backbone (leaderboard order), value ± half width."""
    cols = [j for j, c in enumerate(lb.columns) if c.split(":", 1)[0] == task]
    idx = R.order(lb)
    bests: dict[int, set[int]] = {}  # column -> the rows holding its best value (ties all bold)
    ties, rules = {}, set()
    for j in cols:
        v = lb.values[:, j]
        if np.isfinite(v).any():
            bests[j] = set(np.flatnonzero(v == np.nanmax(v)).tolist())
            ties[j], rule = _ties(lb, j, min(bests[j]))
            rules.add(rule)
    rows = []
    for i in idx:
        b, row = lb.backbones[i], [escape(lb.backbones[i])]
        for j in cols:
            if (b, lb.columns[j]) in lb.na:
                row.append("n/a")
                continue
            iv = lb.stats.cells.get((b, lb.columns[j])) if lb.stats is not None else None
            row.append(value(float(lb.values[i, j]), iv.half_width if iv else None, R.DIGITS,
                             bold=i in bests.get(j, ()), under=i not in bests.get(j, ()) and b in ties.get(j, set())))
        rows.append(row)
    metric = main_metrics().get(task, "value")
    rule = ("not separable from it (the 95\\,\\% interval of the paired difference contains 0)" if rules == {"paired"}
            else "whose 95\\,\\% interval overlaps the best's (the overlap rule: paired-difference intervals per "
                 "column are not available)" if "overlap" in rules else "")
    caption = (rf"{escape(task)}: {escape(metric)} per dataset, $\pm$ the half width of its 95\,\% bootstrap "
               rf"interval; best per column in \textbf{{bold}}" + (rf", \underline{{underlined}}: {rule}" if rule
                                                                      else "") + "; --: missing.")
    header = ["Backbone", *(escape(lb.columns[j].split(":", 1)[1]) for j in cols)]
    return tabular(header, rows, caption, f"tab:backbench-{re.sub(r'[^A-Za-z0-9-]', '-', task)}",
                   "l" + "r" * len(cols))


def to_latex(lb: Leaderboard) -> str:
    """Every table, ready for ``\\input``."""
    if not lb.backbones:
        return "% backbench: no results yet\n"
    parts = [r"% backbench report tables: \usepackage{booktabs,graphicx} in the preamble", leaderboard_table(lb)]
    parts += [task_table(lb, t) for t in lb.tasks]
    return "\n".join(parts)
