"""Commands for tasks through the registry: the shared request runner, and one generated
command for each registered task that has no hand-written one (a new task needs no CLI code)."""

from __future__ import annotations

import inspect
from typing import Any, List, Mapping, Optional

import typer

from backbench.cli import CacheOpt, FeaturesOpt, JsonOpt, MemoryOpt, app, emit_json, table


def run_request(task: str, cache: Optional[str], backbone: str, dataset: str, splits: Mapping[str, Optional[str]],
                params: Mapping[str, Any], *, features: Optional[str], device: str, memory_limit: Optional[str],
                force: bool, complete_only: bool) -> list[tuple[dict, bool]]:
    """Build the request (checked against the task's schema before the cache is opened) and run it."""
    from backbench.device import resolve_device
    from backbench.store import Cache
    from backbench.tasks.base import RunOptions, get_task, run_task

    request = get_task(task).request(backbone, dataset, splits, params=params, features=features)
    options = RunOptions(resolve_device(device), memory_limit, force, complete_only)
    return run_task(Cache(cache, mode="r+"), request, options)


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
    def command(**kw: Any) -> None:
        splits = {r: kw.pop(r) for r in (*task.roles, *task.optional_roles)}
        params = {k: kw.pop(k) for k in task.params}
        params = {k: ([_value(x) for x in v] if isinstance(v, list) else _value(v)) if v is not None else None
                  for k, v in params.items()}
        json_ = kw.pop("json_")
        pairs = run_request(task.name, kw.pop("cache"), kw.pop("backbone"), kw.pop("dataset"), splits, params, **kw)
        if json_:
            return emit_json([{**r, "reused": reused} for r, reused in pairs])
        rows = [{"task": r["task"], "seed": r["seed"], "metric": k, "value": v, "reused": reused}
                for r, reused in pairs for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))]
        table(rows, ["task", "seed", "metric", "value", "reused"], title=f"{task.name} {pairs[0][0]['backbone']}"
              if pairs else task.name)

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
    params += [inspect.Parameter("device", opt, default=typer.Option("auto", "--device"), annotation=str),
               inspect.Parameter("force", opt, default=typer.Option(False, "--force"), annotation=bool),
               inspect.Parameter("complete_only", opt, default=typer.Option(False, "--complete-only"), annotation=bool),
               inspect.Parameter("features", opt, default=FeaturesOpt, annotation=Optional[str]),
               inspect.Parameter("memory_limit", opt, default=MemoryOpt, annotation=Optional[str]),
               inspect.Parameter("cache", opt, default=CacheOpt, annotation=Optional[str]),
               inspect.Parameter("json_", opt, default=JsonOpt, annotation=bool)]
    command.__signature__ = inspect.Signature(params)  # typer reads the options from here
    roles = " ".join(f"--{r} SPLIT" for r in task.roles)
    command.__doc__ = f"{task.help or task.name}\n\nExample:  backbench {task.name} -b BACKBONE -d DATASET {roles}"
    return command


def add_task_commands() -> None:
    """A generated command for every registered task whose name no command has yet."""
    from backbench.tasks.base import registered

    taken = {c.name or c.callback.__name__.rstrip("_").replace("_", "-") for c in app.registered_commands}
    for name, task in registered().items():
        if name not in taken and not task.cli:
            app.command(name)(_command(task))
