"""The battle (config -> every stage) and the report (results -> leaderboard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from backbench.cli import JsonOpt, MemoryOpt, app, clean, emit_json, err, out, table
from backbench.errors import BackbenchError, OptionError, require


def report_path(cache_path: str) -> Path:
    p = Path(cache_path.rstrip("/"))
    return p.with_name(p.name.removesuffix(".zarr") + "-report.html")


@app.command()
def battle(
    config: Optional[Path] = typer.Argument(None, help="TOML config; none runs the built-in digits battle."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Cache (default: $BACKBENCH_CACHE, else the "
                                        "config's `cache`, else battle.zarr)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides the config)."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the built-in default config and exit."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Run the cells on a local dask cluster of N worker processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Run the cells on the dask cluster at ADDRESS (tcp://host:8786)."),
    memory_limit: Optional[str] = MemoryOpt,
    json_: bool = JsonOpt,
) -> None:
    """Run every stage for backbones × datasets × tasks and rank the backbones.

    Extracts only what the cache lacks and runs only the records the results log lacks, so an
    interrupted battle finishes when rerun. A failing cell is reported; the rest still runs.

    Example:  backbench battle            (the built-in default: EfficientNet-Lite on digits)
    Example:  backbench battle my.toml --workers 4    (cells as tasks on a local dask cluster)
    """
    from backbench.battle.config import DEFAULT_TOML, load_config, resolve_cache, with_device
    from backbench.battle.run import plan
    from backbench.store import Cache

    if show_config:
        out.print(DEFAULT_TOML, markup=False)
        return
    if workers and scheduler:
        raise OptionError("give --workers N (a local cluster) or --scheduler ADDRESS, not both")
    cfg = load_config(config)
    if device:
        cfg = with_device(cfg, device)
    path, why = resolve_cache(cache, cfg)
    err.print(f"cache: {path} (from {why})")  # plain text: err never reads markup
    store = Cache(path)
    cells = plan(cfg)
    if workers or scheduler:
        return _finish(_battle_on_dask(cfg, store, len(cells), workers, scheduler, memory_limit), store, json_)
    _finish(_battle_here(cfg, store, len(cells), memory_limit), store, json_)


class _CellLines:
    """Without a terminal (logs, CI, pipes): one line per finished cell, printed as it finishes."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, r) -> None:
        self.done += 1
        err.print(f"[{self.done}/{self.total}] {r.cell.label}: {r.status} in {r.seconds:.1f}s"
                  + (f": {r.message}" if r.message and r.status in ("failed", "skipped", "n/a") else ""),
                  soft_wrap=True)


def _battle_here(cfg, store, n_cells: int, memory_limit: Optional[str]):
    """The battle's cells in this process: a live bar on a terminal, else :class:`_CellLines`."""
    from backbench.battle.run import run_battle

    if not err.is_terminal:
        return run_battle(cfg, store, on_done=_CellLines(n_cells), memory_limit=memory_limit)
    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[detail]}", markup=False),
                  console=err) as bar:
        overall = bar.add_task("battle", total=n_cells, detail="")
        inner = bar.add_task("images", total=None, detail="", visible=False)

        def start(cell, i):
            bar.update(overall, description=clean(cell.stage),
                       detail=clean(f"{cell.row} {cell.dataset} {cell.split}"))
            bar.update(inner, visible=False, completed=0)

        def images(done, total):
            bar.update(inner, visible=True, completed=done, total=total)

        return run_battle(cfg, store, on_start=start, on_done=lambda r: bar.advance(overall), progress=images,
                          memory_limit=memory_limit)


def _battle_on_dask(cfg, store, n_cells: int, workers: Optional[int], scheduler: Optional[str],
                    memory_limit: Optional[str]):
    """The battle's cells as tasks on a dask cluster: local (``workers``) or at ``scheduler``."""
    dask = require("dask", extra="dask")
    distributed = require("dask.distributed", extra="dask")
    Client, LocalCluster = distributed.Client, distributed.LocalCluster

    from backbench.battle.run import run_battle_dask

    lines = None if err.is_terminal else _CellLines(n_cells)
    with Progress(TextColumn("battle on dask", style="bold"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[detail]}", markup=False), console=err, disable=lines is not None) as bar:
        task = bar.add_task("battle", total=n_cells, detail="")

        def done(r) -> None:
            if lines is not None:
                return lines(r)
            bar.update(task, advance=1, detail=clean(f"{r.cell.stage} {r.cell.row} {r.cell.dataset}: {r.status}"))

        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise BackbenchError(f"cannot reach the dask scheduler at {scheduler!r} ({exc}); "
                                     f"start one with `dask scheduler` or use --workers N") from None
            with client:
                return run_battle_dask(cfg, store, client, on_done=done, memory_limit=memory_limit)
        # non-daemonic workers may start DataLoader processes; one thread each: torch uses the cores
        with dask.config.set({"distributed.worker.daemon": False}), \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=None) as cluster, Client(cluster) as client:
            return run_battle_dask(cfg, store, client, on_done=done, memory_limit=memory_limit)


def _finish(summary, store, json_: bool) -> None:
    from backbench.report.cost import cost_table
    from backbench.report.figures import figures
    from backbench.report.html import to_html
    from backbench.report.leaderboard import build
    from backbench.store.results import ResultsLog

    records = ResultsLog(store).records()
    lb = build(records)
    target = report_path(store.path)
    target.write_text(to_html(lb, figures(lb, cost_table(records))))
    rows = [r.to_dict() for r in summary.results]
    if json_:
        emit_json({"cells": rows, "leaderboard": lb.to_dict(), "report": str(target), "cache": str(store.path)})
    else:
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "reused", "failed", "skipped", "n/a")}
        out.print("cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        bad = [r for r in rows if r["status"] in ("failed", "skipped")]
        if bad:
            table(bad, ["stage", "backbone", "dataset", "split", "status", "message"], title="failed cells")
        na = [r for r in rows if r["status"] == "n/a"]
        if na:
            table(na, ["stage", "backbone", "dataset", "message"], title="n/a cells (the task does not apply)")
        _print_leaderboard(lb)
        out.print(f"HTML report: {target}")
        out.print(f"the leaderboard again: backbench report --cache {store.path}")
    if summary.failed:
        raise typer.Exit(1)


def _print_leaderboard(lb) -> None:
    """The ranked table (rank with its interval, aggregate ± half width, z per task), the raw
    metrics (value ± half width), the notes and the statistics' sentences."""
    from backbench.report import render as R

    if not lb.backbones:
        out.print("no results yet: run `backbench battle` or a probe first")
        return
    ranked = R.leaderboard_rows(lb)
    table(ranked, list(ranked[0]), title=f"leaderboard, ranked by {R.AGGREGATE_NAMES[lb.ranked_by]} "
                                         f"(± half width of the 95 % interval)")
    out.print(R.Z_SENTENCE)
    metrics = R.metric_rows(lb)
    table(metrics, list(metrics[0]), title="main metric per task:dataset (top-1, mAP, AUROC, mIoU, box AP), "
                                           "value ± half width")
    for note in lb.notes():
        out.print(f"note: {note}")
    for line in R.statistics_lines(lb):
        out.print(line)


REPORT_FORMATS = "markdown, csv, json, html or latex"


@app.command()
def report(
    cache: Optional[List[str]] = typer.Option(None, "--cache", help="Cache(s) whose results to merge."),
    records: Optional[List[Path]] = typer.Option(None, "--records", help="JSON files from `results --json`."),
    format_: str = typer.Option("markdown", "--format", help=f"{REPORT_FORMATS}."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of stdout."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the 95 % intervals "
                                  "(0: no intervals)."),
    aggregate: str = typer.Option("zmean", "--aggregate", help="What ranks: zmean (BoB's mean z-score), rank "
                                  "(mean rank over task:dataset columns) or iqm (interquartile mean)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the figures as PNG files (300 dpi) here."),
    pdf: Optional[Path] = typer.Option(None, "--pdf", help="Also write the figures as PDF files here."),
    json_: bool = typer.Option(False, "--json", help="Print JSON for machines (the same as --format json)."),
) -> None:
    """The leaderboard with its uncertainty: ranks with intervals, metrics ± half width, pairwise tests.

    Formats: markdown (the terminal tables), csv (one row per backbone), json, html (one self-contained page with its figures), latex (booktabs tables for a paper).

    Example:  backbench report --cache battle.zarr --format html -o report.html
    Example:  backbench report --cache battle.zarr --format latex -o tables.tex --pdf figures/
    """
    from backbench.report.stats import AGGREGATES

    format_ = "json" if json_ else format_
    if format_ not in ("markdown", "csv", "json", "html", "latex"):
        raise OptionError(f"--format {format_!r}: use one of {REPORT_FORMATS}")
    if aggregate not in AGGREGATES:
        raise OptionError(f"--aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
    recs = _gather(cache, records)
    text, lb = _render(recs, format_, bootstrap=bootstrap, aggregate=aggregate, seed=seed, png=png, pdf=pdf)
    if output:
        output.write_text(text)
        err.print(f"wrote {output}")
    elif format_ == "markdown":
        _print_leaderboard(lb)
    else:
        # names from the cache printed as text (the file written by -o keeps them exact); csv's \r\n is a line end
        print(clean(text.replace("\r\n", "\n")))


def _render(recs: list[dict], format_: str, *, bootstrap: int, aggregate: str, seed: int,
            png: Optional[Path], pdf: Optional[Path]):
    """(the report as text, its leaderboard); the figures written to ``png``/``pdf`` folders."""
    from backbench.report import render
    from backbench.report.cost import cost_table
    from backbench.report.figures import figures, write_figures
    from backbench.report.leaderboard import build

    lb = build(recs, bootstrap=bootstrap, aggregate=aggregate, seed=seed)
    formats = tuple(f for f, want in (("svg", format_ == "html"), ("png", png), ("pdf", pdf)) if want)
    figs = figures(lb, cost_table(recs), formats=formats) if formats else {}
    if format_ == "html":
        text = render.to_html(lb, figs)
    elif format_ == "latex":
        text = render.to_latex(lb)
    else:
        text = {"markdown": render.to_markdown, "csv": render.to_csv, "json": render.to_json}[format_](lb)
    for fmt, folder in (("png", png), ("pdf", pdf)):
        if folder:
            for p in write_figures(figs, folder, fmt):
                err.print(f"wrote {p}")
    return text, lb


def _gather(caches: Optional[List[str]], files: Optional[List[Path]]) -> list[dict]:
    from backbench.store.results import ResultsLog
    from backbench.store import Cache

    recs: list[dict] = []
    for c in caches or ([] if files else [None]):
        recs += ResultsLog(Cache(c, mode="r")).records()
    for f in files or []:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BackbenchError(f"--records {str(f)!r}: not a JSON list of records ({exc})") from None
        recs += data if isinstance(data, list) else [data]
    return recs
