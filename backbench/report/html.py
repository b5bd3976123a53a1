"""The HTML report: one self-contained page (figures inline as SVG data, a few lines of inline
JavaScript to sort the leaderboard, no external assets), readable at 1,280 px: the page never
scrolls sideways, a wide table scrolls inside its own box."""

from __future__ import annotations

import base64
import html
import re
from typing import Any, Sequence

import numpy as np

from backbench.report import render as R
from backbench.report.leaderboard import Leaderboard

STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.5em 2em;
 max-width:1180px;color:#1d1d1d;line-height:1.45;overflow-wrap:anywhere}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0 1em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d4d4d4;padding:3px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child,td.name,th.name{text-align:left}
td.name{white-space:normal;min-width:12em;max-width:26em}
th{background:#f2f2f2;position:sticky;top:0}
table.sortable th{cursor:pointer}table.sortable th:hover{background:#e4e4e4}
tr.tied td{background:#eef6fb}
.na{color:#777}.note,.caption,figcaption{color:#444;font-size:.92em}
figure{margin:1.2em 0;max-width:100%}figure img{display:block;max-width:100%;height:auto}
figcaption{max-width:820px;margin-top:.4em}
.stat{background:#f7f7f7;border-left:3px solid #0072B2;padding:.5em .8em}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,k){th.addEventListener('click',function(){
  var b=t.tBodies[0],rows=Array.from(b.rows),up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';
  rows.sort(function(x,y){var p=x.cells[k].dataset.v,q=y.cells[k].dataset.v,a=parseFloat(p),c=parseFloat(q);
   if(isNaN(a)||isNaN(c)){if(!isNaN(a))return -1;if(!isNaN(c))return 1;return up?p.localeCompare(q):q.localeCompare(p);}
   return up?a-c:c-a;});
  rows.forEach(function(r){b.appendChild(r);});});});});
"""


def e(text: Any) -> str:
    return html.escape(str(text))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = False,
          row_class: Sequence[str] | None = None) -> str:
    """A table in its own horizontally scrolling box; a cell is text or (text, sort key)."""
    names = [_is_name(c) and c not in (R.NA, R.MISSING) for c in (rows[0] if rows else [])]
    head = "".join(f"<th{' class=name' if k < len(names) and names[k] else ''}>{e(h)}</th>"
                   for k, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        cells = []
        for c in row:
            text, key = c if isinstance(c, tuple) else (c, c)
            cls = ' class="na"' if text in (R.NA, R.MISSING) else ' class="name"' if _is_name(key) else ""
            cells.append(f'<td{cls} data-v="{e("" if key is None else key)}">{e(text)}</td>')
        cls = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table{" class=sortable" if sortable else ""}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _is_name(key: Any) -> bool:
    """Text (a name) rather than a number: left-aligned."""
    return isinstance(key, str) and not re.match(r"^[+\-−]?\d", key)


def _key(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


SHORT = {"zmean": "z mean (BoB)", "rank": "mean rank", "iqm": "IQM"}  # column heads; the caption says more


def leaderboard_table(lb: Leaderboard) -> str:
    """Rank, rank interval, backbone, every aggregate with its interval, tasks covered; sortable."""
    st, idx = lb.stats, R.order(lb)
    hows = [lb.ranked_by] + [h for h in R.AGGREGATE_NAMES if h != lb.ranked_by and st is not None]
    header = ["rank", "rank 95%", "backbone", "≈ #1", *(SHORT[h] for h in hows), "tasks"]
    rows, classes = [], []
    for i in idx:
        b = lb.backbones[i]
        aggs = [(R.aggregate_text(lb, i, h), _key(st.aggregates[h][b].value if st is not None and b in
                                                  st.aggregates.get(h, {}) else lb.aggregate[i])) for h in hows]
        rows.append([(str(lb.rank[i]), int(lb.rank[i])), (R.rank_interval(lb, i), int(lb.rank[i])), b,
                     (R.tied_with_first(lb, i), {"#1": 0, "yes": 1, "no": 2}.get(R.tied_with_first(lb, i))), *aggs, (f"{lb.covered(i)}/{len(lb.tasks)}", lb.covered(i))])
        classes.append("tied" if st is not None and b in st.tied_with_first and R.has_intervals(lb) else "")
    return table(header, rows, sortable=True, row_class=classes)


def zscore_table(lb: Leaderboard) -> str:
    rows = [[lb.backbones[i], *((R.number(float(lb.task_z[i, k]), R.Z_DIGITS, sign=True), _key(lb.task_z[i, k]))
                                for k in range(len(lb.tasks)))] for i in R.order(lb)]
    return table(["backbone", *(f"z:{t}" for t in lb.tasks)], rows, sortable=True)


def metric_table(lb: Leaderboard) -> str:
    rows = [[lb.backbones[i], *((R.cell(lb, i, j), _key(lb.values[i, j])) for j in range(len(lb.columns)))]
            for i in R.order(lb)]
    return table(["backbone", *lb.columns], rows, sortable=True)


def spearman_section(lb: Leaderboard) -> str:
    """The task correlation table, always present; a note says when it cannot say anything."""
    note = R.spearman_note(lb)
    rows = [[t, *(R.spearman_cell(lb, a, b) if not note or a == b else R.MISSING for b in range(len(lb.tasks)))]
            for a, t in enumerate(lb.tasks)]
    return (table(["task", *lb.tasks], rows) + (f'<p class="note">Note: {e(note)}</p>' if note else "")
            if lb.tasks else '<p class="note">no tasks yet.</p>')


def pairwise_section(lb: Leaderboard) -> str:
    st = lb.stats
    if st is None:
        return '<p class="note">no pairwise statistics (--bootstrap 0).</p>'
    parts = [f'<p class="stat">Friedman test: {e(R.friedman_text(st.friedman))}.</p>']
    if len(lb.backbones) > 1 and st.prob_beats.size and R.has_intervals(lb):
        rows = R.pairwise_rows(lb)
        parts += ["<p>P(row ranks above column) over the bootstrap leaderboards "
                  "(0.5: a coin flip; above 0.975: the row is ahead in almost every replicate):</p>",
                  table(list(rows[0]), [list(r.values()) for r in rows])]
    if st.posthoc is not None:
        idx = R.order(lb)
        rows = [[lb.backbones[a], *(R.MISSING if a == b else R.number(float(st.posthoc[a, b]), 3) for b in idx)]
                for a in idx]
        parts += ["<p>Wilcoxon signed-rank p-values over the (task, dataset) blocks, Holm-corrected "
                  "(below 0.05: the pair differs):</p>", table(["p", *(lb.backbones[b] for b in idx)], rows)]
    return "".join(parts)


def figure_section(figs: Any) -> str:
    """Each figure as an inline SVG (a data URI: its ids cannot clash with another's) with its caption."""
    out = []
    for name, f in figs.items():
        if hasattr(f, "data"):
            fmt, data, caption = ("svg", f.data["svg"], f.caption) if "svg" in f.data else ("png", f.data["png"],
                                                                                           f.caption)
        else:  # raw PNG bytes, as figures used to be
            fmt, data, caption = "png", f, name.replace("_", " ")
        mime = "image/svg+xml" if fmt == "svg" else "image/png"
        out.append(f'<figure id="fig-{e(name)}"><img alt="{e(caption)}"{_width(data, fmt)} '
                   f'src="data:{mime};base64,{base64.b64encode(data).decode()}">'
                   f"<figcaption>{e(caption)}</figcaption></figure>")
    for name, why in getattr(figs, "skipped", {}).items():
        out.append(f'<p class="note">Not drawn: {e(name.replace("_", " "))}: {e(why)}.</p>')
    return "".join(out) or '<p class="note">no figures.</p>'


SCALE = 1.35  # every figure drawn 1.35 x its print size: one font size on the page, and readable


def _width(data: bytes, fmt: str) -> str:
    """The figure's display width: its SVG width (points) scaled by :data:`SCALE`, so figures
    trimmed to different widths keep the same font size on the page."""
    m = re.search(rb'<svg[^>]*\swidth="([0-9.]+)pt"', data[:2000]) if fmt == "svg" else None
    return f' style="width:{float(m.group(1)) * 4 / 3 * SCALE:.0f}px"' if m else ""


def provenance_table(lb: Leaderboard) -> str:
    cols = list(lb.provenance[0]) if lb.provenance else []
    return table(cols, [[str(p[c]) if p[c] is not None else R.MISSING for c in cols] for p in lb.provenance])


def to_html(lb: Leaderboard, figs: Any = None, title: str = "backbench leaderboard") -> str:
    """The whole report as one self-contained HTML page."""
    figs = figs or {}
    if not lb.backbones:
        body = "<p>no results yet: run <code>backbench battle</code> or a probe first.</p>"
    else:
        stats_lines = R.statistics_lines(lb)
        body = (f"<h2>Leaderboard</h2>{leaderboard_table(lb)}"
                f'<p class="caption">Click a column header to sort. z mean (BoB): the mean over tasks of the '
                f'z-scores below; mean rank: over the task:dataset columns, 1 = best; IQM: the interquartile '
                f'mean of min-max normalised scores; tasks: how many tasks the mean covers. '
                f'{e(stats_lines[0][:1].upper() + stats_lines[0][1:])}</p>'
                + "".join(f'<p class="stat">{e(s)}</p>' for s in stats_lines[1:2])
                + f"<h2>z-scores per task</h2>{zscore_table(lb)}<p class='caption'>{e(R.Z_SENTENCE)}</p>"
                f"<h2>Main metric per task:dataset</h2>{metric_table(lb)}"
                f"<p class='caption'>value ± half width of its 95 % bootstrap interval; – missing (no record), "
                f"n/a: the task does not apply; ± n/a: no per-sample outcomes kept for that record.</p>"
                + "".join(f"<p class='note'>Note: {e(n)}</p>" for n in lb.notes())
                + f"<h2>Figures</h2>{figure_section(figs)}"
                f"<h2>Task correlation</h2>{spearman_section(lb)}"
                f"<h2>Pairwise comparisons</h2>{pairwise_section(lb)}"
                + "".join(f"<p class='note'>{e(s)}</p>" for s in stats_lines[2:] if not s.startswith("Friedman"))
                + f"<h2>Provenance</h2>{provenance_table(lb)}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>{body}<script>{SORT_JS}</script></body></html>")
