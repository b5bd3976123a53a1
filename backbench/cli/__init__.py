"""The ``backbench`` command line: the only place that prints, parses or sets exit codes.

Commands live in sibling modules, one per stage; this module holds the app, the shared
options and the output helpers (tables, ``--json``, one-line errors).
"""

from __future__ import annotations

import json
import contextvars
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backbench.errors import BackbenchError

app = typer.Typer(
    name="backbench",
    help="Which pretrained vision backbone should I build on? Extract features once into a Zarr "
    "cache, then probe, kNN, OOD and rank backbones from it.\n\n"
    "Example:  backbench extract timm:resnet18@random --data digits --dataset digits --split train",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_WIDTH = None if sys.stdout.isatty() else 200  # pipes and CI logs get whole names, not "…"
out = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

CacheOpt = typer.Option(None, "--cache", envvar="BACKBENCH_CACHE",
                        help="Feature cache (default: $BACKBENCH_CACHE, else ./features.zarr).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")


def _set_memory_limit(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from backbench.probe.stream import _LIMIT, parse_size

        _LIMIT.set(parse_size(value))
    return value


MemoryOpt = typer.Option(None, "--memory-limit", envvar="BACKBENCH_MEMORY_LIMIT", callback=_set_memory_limit,
                         help="Stream features from the cache above this much float32 data "
                              "(8GB, 500MB; 0 = always). Default: half the free memory.")


def _set_features(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from backbench.extract.kinds import probe_kinds
        from backbench.probe.data import _FEATURES

        probe_kinds(value)
        _FEATURES.set(value)
    return value


FeaturesOpt = typer.Option(None, "--features", callback=_set_features,
                           help="Feature kind to probe: pooled (default), cls, mean-patch, cls+mean-patch, "
                                "layer-4:cls; K1,K2 concatenated; last4:cls = the last 4 blocks' cls.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    """Global options."""


def emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def table(rows: Iterable[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    """A readable table of dict rows; booleans become check marks."""
    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in ("n", "d", "N", "D", "rows") else "left", overflow="fold",
                     no_wrap=c in ("backbone", "name"))
    for r in rows:
        t.add_row(*[_cell(r.get(c)) for c in columns])
    out.print(t)


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "[green]✓[/]" if v else "[red]✗[/]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _register_commands() -> None:
    from backbench.cli import battle_cmds, cache_cmds, ood_cmds, probe_cmds  # noqa: F401


MULTI_VALUE = {"--shots", "-k", "--ks", "--C", "--ood", "--scores", "--shifted", "--layers", "--features", "--labels"}
_NEGATIVE = re.compile(r"^-\d+$")  # --layers -1 -4: negative numbers are values, not options


def expand_multi(args: list[str]) -> list[str]:
    """``--shots 1 2 4`` -> ``--shots 1 --shots 2 --shots 4`` (click options take one value)."""
    out_args: list[str] = []
    flag = None
    for a in args:
        if a in MULTI_VALUE:
            flag = a
            out_args.append(a)
            continue
        value = not a.startswith("-") or (flag == "--layers" and _NEGATIVE.match(a))
        if flag and out_args[-1] != flag and value:
            out_args += [flag, a]
            continue
        if not value:
            flag = None
        out_args.append(a)
    return out_args


@contextmanager
def _notes() -> Iterator[None]:
    """Library warnings meant for the user (results not recorded) become one-line notes on stderr."""
    import warnings

    from backbench.report.results import ResultsNotRecorded

    with warnings.catch_warnings():
        warnings.simplefilter("always", ResultsNotRecorded)
        shown = warnings.showwarning

        def show(message, category, *rest, **kw) -> None:
            if issubclass(category, ResultsNotRecorded):
                err.print(f"[yellow]note:[/] {escape(str(message))}")
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one-line errors, non-zero exit codes, tracebacks only with --debug."""
    import click

    args = expand_multi(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    _register_commands()
    try:
        with _notes():  # a fresh context per call: options such as --memory-limit never leak into the next one
            code = contextvars.copy_context().run(app, args=args, standalone_mode=False, prog_name="backbench")
        if isinstance(code, int) and code:  # typer.Exit(n) comes back as a return value here
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("[yellow]interrupted:[/] finished chunks and records are kept; rerun the same command to resume")
        sys.exit(130)
    except BackbenchError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except Exception as exc:  # unexpected: still one line unless --debug
        if debug:
            raise
        err.print(f"[red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)")
        sys.exit(1)
