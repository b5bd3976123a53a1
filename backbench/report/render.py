"""Leaderboard output: markdown, csv, json, a self-contained HTML page, PNG figures."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from backbench.report.leaderboard import Leaderboard

FORMATS = ("markdown", "csv", "json", "html")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_markdown(lb: Leaderboard) -> str:
    rows = lb.rows()
    if not rows:
        return "_no results yet: run `backbench battle` or a probe first_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    if lb.notes():  # which cells are missing, under the table they are missing from
        out += ["", *(f"Note: {n}" for n in lb.notes())]
    if len(lb.tasks) > 1:
        out += ["", "Spearman rank correlation between tasks (across backbones):", "",
                "| task | " + " | ".join(lb.tasks) + " |", "|" + "---|" * (len(lb.tasks) + 1)]
        out += [f"| {t} | " + " | ".join(_fmt(_cell(v)) for v in lb.spearman[i]) + " |" for i, t in enumerate(lb.tasks)]
    return "\n".join(out) + "\n"


def _cell(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 3)


def to_csv(lb: Leaderboard) -> str:
    rows = lb.rows()
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def to_json(lb: Leaderboard) -> str:
    return json.dumps(lb.to_dict(), indent=2)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def figures(lb: Leaderboard, cost: dict[str, dict[str, float]] | None = None) -> dict[str, bytes]:
    """PNG figures: z-score heatmap, aggregate bars, accuracy vs cost, few-shot curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(np.argsort(lb.rank))
    names = [lb.backbones[i] for i in order]
    out: dict[str, bytes] = {}
    if lb.tasks:
        fig, ax = plt.subplots(figsize=(1.2 * len(lb.tasks) + 3, 0.45 * len(names) + 1.5))
        z = lb.task_z[order]
        im = ax.imshow(np.nan_to_num(z), cmap="RdYlGn", vmin=-2, vmax=2, aspect="auto")
        ax.set_xticks(range(len(lb.tasks)), lb.tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for (i, j), v in np.ndenumerate(z):
            ax.text(j, i, "–" if np.isnan(v) else f"{v:+.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="z-score")
        ax.set_title("z-score per task (higher is better)")
        out["zscore_heatmap"] = _png(fig)
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
        agg = lb.aggregate[order]
        ax.barh(names[::-1], np.nan_to_num(agg)[::-1], color=["#2a9d8f" if v >= 0 else "#e76f51" for v in agg[::-1]])
        ax.set_xlabel("mean z-score across tasks")
        ax.set_title("aggregate (Battle of the Backbones)")
        out["aggregate"] = _png(fig)
    if cost and "probe" in lb.tasks:
        out["accuracy_vs_cost"] = _cost_figure(lb, cost, plt)
    if lb.fewshot:
        fig, ax = plt.subplots(figsize=(6, 4))
        for b, curve in sorted(lb.fewshot.items()):
            ax.plot(list(curve), list(curve.values()), marker="o", label=b)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 accuracy (mean over seeds and datasets)")
        ax.legend(fontsize=7)
        ax.set_title("few-shot linear probe")
        out["fewshot_curves"] = _png(fig)
    return out


def _cost_figure(lb: Leaderboard, cost: dict[str, dict[str, float]], plt) -> bytes:
    from matplotlib.ticker import EngFormatter

    cols = [j for j, c in enumerate(lb.columns) if c.startswith("probe:")]
    acc = np.nanmean(lb.values[:, cols], axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "n_params", "parameters"), (axes[1], "images_per_s", "extraction images/s")):
        for i, b in enumerate(lb.backbones):
            x = cost.get(b, {}).get(key)
            if x:
                ax.scatter(x, acc[i])
                ax.annotate(b.split(":", 1)[-1], (x, acc[i]), fontsize=7)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.margins(x=0.3, y=0.1)
        ax.set_xlabel(label)
        ax.set_ylabel("linear-probe top-1")
    fig.suptitle("accuracy against cost")
    return _png(fig)


def to_html(lb: Leaderboard, figs: dict[str, bytes], title: str = "backbench leaderboard") -> str:
    """One self-contained page: tables and base64 PNG figures, no external assets."""
    rows = lb.rows()
    cols = list(rows[0]) if rows else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    prov_cols = list(lb.provenance[0]) if lb.provenance else []
    prov = "".join("<tr>" + "".join(f"<td>{html.escape(str(p[c]))}</td>" for c in prov_cols) + "</tr>"
                   for p in lb.provenance)
    imgs = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}">'
                   f"<figcaption>{k.replace('_', ' ')}</figcaption></figure>" for k, v in figs.items())
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}"
             "figure{display:inline-block;margin:1em}img{max-width:640px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Leaderboard</h2><table><tr>{head}</tr>{body}</table>"
            + "".join(f"<p class='note'>Note: {html.escape(n)}</p>" for n in lb.notes()) +
            f"<h2>Figures</h2>{imgs}"
            f"<h2>Provenance</h2><table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in prov_cols)}</tr>{prov}</table>"
            f"</body></html>")


def write_pngs(figs: dict[str, bytes], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in figs.items():
        (folder / f"{name}.png").write_bytes(data)
        paths.append(folder / f"{name}.png")
    return paths
