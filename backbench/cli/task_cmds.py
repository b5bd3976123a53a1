"""Commands for tasks through the registry: the shared request runner, and one generated
command for each registered task that has no hand-written one (a new task needs no CLI code)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional

import typer

from backbench.cli import CacheOpt, FeaturesOpt, JsonOpt, MemoryOpt, app, emit_json, table


@dataclass(frozen=True)
class Common:
    """The options every task command shares, gathered by :func:`task_command`."""

    device: str = "auto"
    force: bool = False
    complete_only: bool = False
    features: Optional[str] = None
    memory_limit: Optional[str] = None
    cache: Optional[str] = None
    json: bool = False


_COMMON = [("device", str, typer.Option("auto", "--device", help="auto, cpu or cuda.")),
           ("force", bool, typer.Option(False, "--force", help="Recompute even if the results log has this record.")),
           ("complete_only", bool, typer.Option(False, "--complete-only",
                                                help="Use the finished rows of an incomplete group.")),
           ("features", Optional[str], FeaturesOpt), ("memory_limit", Optional[str], MemoryOpt),
           ("cache", Optional[str], CacheOpt), ("json_", bool, JsonOpt)]


def task_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func(..., common: Common)`` as a typer command: its own options, then the shared ones
    (device, force, complete-only, features, memory-limit, cache, json), declared once here."""
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "common"]
    shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in _COMMON]

    @functools.wraps(func)
    def command(**kw: Any) -> Any:
        common = Common(**{("json" if n == "json_" else n): kw.pop(n) for n, _, _ in _COMMON})
        return func(**kw, common=common)

    command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared)
    return command


def run_request(task: str, common: Common, backbone: str, dataset: str, splits: Mapping[str, Optional[str]],
                params: Mapping[str, Any]) -> list[tuple[dict, bool]]:
    """Build the request (checked against the task's schema before the cache is opened) and run it."""
    from backbench.store import Cache
    from backbench.tasks.base import RunOptions, get_task, run_task

    request = get_task(task).request(backbone, dataset, splits, params=params, features=common.features)
    options = RunOptions(common.device, common.memory_limit, common.force, common.complete_only)
    return run_task(Cache(common.cache, mode="r+"), request, options)


def emit_records(pairs: list[tuple[dict, bool]], common: Common, one: bool = False) -> bool:
    """``--json``: the records (with ``reused``) as JSON; returns whether it printed them."""
    if common.json:
        rows = [{**r, "reused": reused} for r, reused in pairs]
        emit_json(rows[0] if one and rows else rows)
    return common.json


def _value(text: str) -> Any:
    """A command-line value as the number it spells, else as text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _command(task) -> Any:
    """A typer command for ``task``: its split roles and parameters as options."""
    def command(common: Common, **kw: Any) -> None:
        splits = {r: kw.pop(r) for r in (*task.roles, *task.optional_roles)}
        params = {k: ([_value(x) for x in v] if isinstance(v, list) else _value(v)) if v is not None else None
                  for k, v in kw.items() if k in task.params}
        pairs = run_request(task.name, common, kw["backbone"], kw["dataset"], splits, params)
        if emit_records(pairs, common):
            return
        rows = [{"task": r["task"], "seed": r["seed"], "metric": k, "value": v, "reused": reused}
                for r, reused in pairs for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))]
        table(rows, ["task", "seed", "metric", "value", "reused"], title=task.name)

    opt = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("backbone", opt, default=typer.Option(..., "--backbone", "-b"), annotation=str),
              inspect.Parameter("dataset", opt, default=typer.Option(..., "--dataset", "-d"), annotation=str)]
    params += [inspect.Parameter(r, opt, annotation=Optional[str],
                                 default=typer.Option(... if r in task.roles else None, f"--{r}"))
               for r in (*task.roles, *task.optional_roles)]
    for name, p in task.params.items():
        many = isinstance(p.default, list) or "list" in p.what
        params.append(inspect.Parameter(name, opt, annotation=Optional[List[str]] if many else Optional[str],
                                        default=typer.Option(None, f"--{name.replace('_', '-')}",
                                                             help=f"{p.what} (default: {p.default})")))
    params.append(inspect.Parameter("common", opt, annotation=Common))
    command.__signature__ = inspect.Signature(params)
    roles = " ".join(f"--{r} SPLIT" for r in task.roles)
    command.__doc__ = f"{task.help or task.name}\n\nExample:  backbench {task.name} -b BACKBONE -d DATASET {roles}"
    command.__name__ = task.name.replace("-", "_")
    return task_command(command)


def add_task_commands() -> None:
    """A generated command for every registered task whose name no command has yet."""
    from backbench.tasks.base import registered

    taken = {c.name or c.callback.__name__.rstrip("_").replace("_", "-") for c in app.registered_commands}
    for name, task in registered().items():
        if name not in taken and not task.cli:
            app.command(name)(_command(task))
