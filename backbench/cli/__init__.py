"""The ``backbench`` command line: the only place that prints, parses or sets exit codes.

Commands live in sibling modules, one per stage; this module holds the app, the shared
options and the output helpers (tables, ``--json``, one-line errors).
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
# C0 and C1 control characters (ESC, BEL, CSI, ...) but tab and newline, shown as \x1b etc.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


def clean(value: Any) -> str:
    """``value`` as printable text: control characters made visible, so nothing read from a
    cache (names, attributes, paths) can move the cursor, retitle or recolour the terminal."""
    return str(value).translate(_CONTROL)


def plain(value: Any, style: str = "") -> Text:
    """``value`` as a rich Text that is never read as markup or emoji codes."""
    return Text(clean(value), style=style)


class TextConsole(Console):
    """A console that prints strings as plain text: no markup, no emoji codes, no control
    characters. Styled output is built from :func:`plain` pieces."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - rich's name
        super().print(*(plain(o) if isinstance(o, str) else o for o in objects), **kwargs)


out = TextConsole(highlight=False, width=_WIDTH, markup=False, emoji=False)
err = TextConsole(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def say_error(message: str, label: str = "error:", style: str = "red", console: Console | None = None) -> None:
    """One line on stderr: a coloured label, then ``message`` as plain text."""
    (console or err).print(Text.assemble(plain(label, style), " ", plain(message)))


CacheOpt = typer.Option(None, "--cache", envvar="BACKBENCH_CACHE",
                        help="Feature cache (default: $BACKBENCH_CACHE, else ./features.zarr).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")


MemoryOpt = typer.Option(None, "--memory-limit", envvar="BACKBENCH_MEMORY_LIMIT",
                         help="Stream features from the cache above this much float32 data "
                              "(8GB, 500MB; 0 = always). Default: half the free memory.")
FeaturesOpt = typer.Option(None, "--features",
                           help="Feature kind to probe: pooled (default), cls, mean-patch, cls+mean-patch, "
                                "layer-4:cls; K1,K2 concatenated; last4:cls = the last 4 blocks' cls.")


def _print_version(value: bool) -> None:
    if value:
        from backbench import __version__

        out.print(f"backbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print backbench's version and exit.")) -> None:
    """Global options."""


def emit_json(data: Any) -> None:
    """JSON for machines; ASCII only, so no control character reaches the terminal."""
    out.print_json(json.dumps(data, default=str), ensure_ascii=True)


def table(rows: Iterable[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    """A readable table of dict rows; booleans become check marks; every cell is plain text."""
    t = Table(title=None if title is None else plain(title), header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in ("n", "d", "N", "D", "rows") else "left", overflow="fold",
                     no_wrap=c in ("backbone", "name"))
    for r in rows:
        t.add_row(*[_cell(r.get(c)) for c in columns])
    out.print(t)


def _cell(v: Any) -> Text:
    if isinstance(v, bool):
        return plain("✓", "green") if v else plain("✗", "red")
    if isinstance(v, float):
        return plain(f"{v:.4g}")
    return plain("" if v is None else v)


def _register_commands() -> None:
    from backbench.cli import (battle_cmds, cache_cmds, dense_cmds, ood_cmds, probe_cmds, share_cmds,  # noqa: F401
                               task_cmds)
    from backbench.cli import cluster_cmds  # noqa: F401
    from backbench.cli import vl_cmds  # noqa: F401

    task_cmds.add_task_commands()


_NUMBER = re.compile(r"^-\d+(\.\d*)?$")  # --layers -1 -4: negative numbers are values, not options


def multi_value_options(argv: list[str]) -> set[str]:
    """The option names of the command ``argv`` names that take several values (``multiple=True``).

    Read from the app's own declarations (``List[...]`` options), so no list is kept by hand.
    """
    root = typer.main.get_command(app)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = getattr(root, "commands", {}).get(name)
    params = command.params if command is not None else []
    return {opt for p in params if getattr(p, "multiple", False) and p.param_type_name == "option" for opt in p.opts}


def expand_multi(args: list[str]) -> list[str]:
    """``--shots 1 2 4`` -> ``--shots 1 --shots 2 --shots 4`` (click options take one value each)."""
    multi, out_args, flag = multi_value_options(args), [], None
    for i, a in enumerate(args):
        if a == "--":  # everything after it is an argument
            return out_args + args[i:]
        if flag and (not a.startswith("-") or _NUMBER.match(a)):
            out_args += [a] if out_args[-1] == flag else [flag, a]
            continue
        flag = a if a in multi else None
        out_args.append(a)
    return out_args


@contextmanager
def _notes() -> Iterator[None]:
    """Library warnings meant for the user (results not recorded) become one-line notes on stderr."""
    import warnings

    from backbench.errors import BackbenchWarning
    from backbench.store.results import ResultsNotRecorded

    with warnings.catch_warnings():
        warnings.simplefilter("always", ResultsNotRecorded)
        warnings.simplefilter("default", BackbenchWarning)  # each distinct note once
        shown = warnings.showwarning

        def show(message, category, *rest, **kw) -> None:
            if issubclass(category, (ResultsNotRecorded, BackbenchWarning)):
                say_error(str(message), "note:", "yellow")
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


def _usage_error(exc: typer.TyperException) -> int:
    """click's own message (with its "Did you mean"), on one line; the exit code click gives."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `backbench`: the help (typer checks the same way)
        exc.show()
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and exc.exit_code == 2 else ""
    say_error(exc.format_message() + hint)
    return exc.exit_code


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one-line errors, non-zero exit codes, tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _register_commands()
    try:
        args = expand_multi(args)
        with _notes():
            code = app(args=args, standalone_mode=False, prog_name="backbench")
        if isinstance(code, int) and code:  # typer.Exit(n) comes back as a return value here
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # typer's own click: usage errors (exit 2), bad files
        sys.exit(_usage_error(exc))
    except (typer.Abort, KeyboardInterrupt):
        say_error("finished chunks and records are kept; rerun the same command to resume", "interrupted:", "yellow")
        sys.exit(130)
    except BackbenchError as exc:
        if debug:
            raise
        say_error(str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:  # unexpected: still one line unless --debug
        if debug:
            raise
        say_error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        sys.exit(1)
