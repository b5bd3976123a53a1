"""The task layer's data: what a task reads (:class:`FeatureSpec`), what a result depends on
(:class:`TaskRequest`), how it runs (:class:`RunOptions`), and the :class:`Task` a module registers.

A request is data: the CLI, the battle and the Python API build the same request, and its
:meth:`TaskRequest.record` dict (task, backbone row label, dataset, splits, params, seed, the
groups' cache keys) is what the results log hashes into a record's key. Nothing reaches a
task through hidden state: the feature kind, the memory limit and the device are fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from backbench.errors import ProbeInputError

Record = dict[str, Any]


@dataclass(frozen=True)
class FeatureSpec:
    """The feature kind(s) a task reads: ``pooled`` (default), ``cls``, ``layer-4:cls``, or
    ``K1,K2`` concatenated (``lastN:BASE`` expands); see :mod:`backbench.kinds`."""

    spec: str = "pooled"

    def __post_init__(self) -> None:
        from backbench.kinds import probe_kinds

        object.__setattr__(self, "spec", (self.spec or "pooled").strip())
        probe_kinds(self.spec)  # validates

    @classmethod
    def of(cls, value: FeatureSpec | str | None) -> FeatureSpec:
        return value if isinstance(value, FeatureSpec) else cls(value or "pooled")

    @property
    def kinds(self) -> list[str]:
        from backbench.kinds import probe_kinds

        return probe_kinds(self.spec)

    @property
    def pooled(self) -> bool:
        return self.spec == "pooled"

    def row_label(self, backbone: str) -> str:
        """The leaderboard row of ``backbone`` read with these features: ``NAME`` or ``NAME#cls``."""
        return backbone if self.pooled else f"{backbone}#{self.spec}"


class _Device:
    """:attr:`RunOptions.device`: ``auto`` is resolved (:func:`backbench.device.resolve_device`,
    which imports torch) the first time a task reads it, so a reused record never imports
    torch; any other value is checked at once."""

    def __get__(self, obj: Any, owner: Any = None) -> str:
        if obj is None:
            return "cpu"  # the field's default
        if obj.__dict__["_device"] == "auto":
            from backbench.device import resolve_device

            obj.__dict__["_device"] = resolve_device("auto")
        return obj.__dict__["_device"]

    def __set__(self, obj: Any, value: str) -> None:
        from backbench.device import resolve_device

        obj.__dict__["_device"] = value if value == "auto" else resolve_device(value)


@dataclass(frozen=True)
class RunOptions:
    """How a request runs, not what it computes: none of these enters a record's key."""

    device: _Device = _Device()  # a str: auto (resolved when first read), cpu, cuda, cuda:N, mps
    memory_limit: int | str | None = None  # stream above this much float32 data (None: the default)
    force: bool = False  # recompute even if the results log has the record
    complete_only: bool = False  # read the finished rows of an incomplete group


@dataclass(frozen=True)
class TaskRequest:
    """Everything a result depends on: task, backbone, feature spec, dataset, splits, params, seed."""

    task: str
    backbone: str
    dataset: str
    splits: Mapping[str, str | None] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    seed: int = 0

    def record(self, groups: Mapping[str, str], *, task: str | None = None, params: Mapping[str, Any] | None = None,
               splits: Mapping[str, Any] | None = None, seed: int | None = None) -> Record:
        """The dict the results log keys a record by (the same fields, in the same form, as
        records written before the task layer, so they are reused)."""
        return {"task": task or self.task, "backbone": self.features.row_label(self.backbone),
                "dataset": self.dataset, "splits": dict(self.splits if splits is None else splits),
                "params": dict(self.params if params is None else params),
                "seed": self.seed if seed is None else seed, "groups": dict(groups)}


@dataclass(frozen=True)
class Resampler:
    """How a record's main metric is recomputed on a resample of its evaluated samples, from
    the per-sample outcome arrays the record keeps (so intervals need no refit).

    ``strata``: the sizes of the independent sample sets the metric is made of (``(n_eval,)``
    for accuracy; ``(n_id, n_ood_1, ...)`` for OOD AUROC, each set resampled on its own).
    ``statistic(idx)``: ``idx`` holds one int array of shape (B, n_s) per stratum, each row a
    resample of that stratum's positions; it returns the B metric values (float64). With every
    row ``arange(n_s)`` it returns the record's own metric (a test checks this for every task).
    The report draws the same ``idx`` for every backbone of a column whose strata agree
    (paired bootstrap).
    """

    strata: tuple[int, ...]
    statistic: Callable[[Sequence[Any]], Any]
    # optional, faster form of the same statistic for metrics that are sums over samples: it gets,
    # per stratum, the (B, n_s) float64 multiplicity of each position in each resample instead
    weighted: Callable[[Sequence[Any]], Any] | None = None


Check = tuple  # (accepts the value?, what is accepted[, the canonical form of an accepted value])


@dataclass(frozen=True)
class Param:
    """One parameter of a task: its default, what it accepts (a predicate and its description),
    and whether its values name ``DATASET:SPLIT`` sets (the battle extracts those first)."""

    default: Any
    accepts: Callable[[Any], bool]
    what: str
    cast: Callable[[Any], Any] = lambda v: v  # one spelling per value (1 and 1.0 key one record)
    refs: bool = False


@dataclass(frozen=True)
class Task:
    """A registered task: its name, parameter schema, split roles, the metric the leaderboard
    ranks by, and ``run(cache, request, options) -> [(record, reused), ...]``.

    ``needs``: parameters of which at least one must be given (a task that runs nothing
    otherwise). ``records``: other task names its records carry, each with its metric.
    ``resample``: builds the :class:`Resampler` of one of its records (report intervals).
    """

    name: str
    run: Callable[..., list[tuple[Record, bool]]]
    params: Mapping[str, Param] = field(default_factory=dict)
    roles: Sequence[str] = ("train", "eval")
    optional_roles: Sequence[str] = ()
    metric: str = "top1"
    needs: Sequence[str] = ()
    records: Mapping[str, str] = field(default_factory=dict)  # other record task names -> their metric
    help: str = ""
    cli: str = ""  # the hand-written command that runs it, if any (else the CLI generates `backbench NAME`)
    dense: str = ""  # "mask" or "boxes": a dense task, reading a feature map and the dense labels beside it
    # (record, outcome arrays) -> how its main metric resamples; None: the task keeps no outcomes
    resample: Callable[[Record, Mapping[str, Any]], Resampler | None] | None = None

    def check_params(self, raw: Mapping[str, Any], where: str | None = None) -> tuple[dict[str, Any], list[str]]:
        """(params with defaults, problems): unknown keys and refused values, one problem each."""
        where = where or f"tasks.{self.name}"
        problems = []
        extra = sorted(set(raw) - set(self.params))
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(self.params) or 'none'})")
        out: dict[str, Any] = {}
        for key, param in self.params.items():
            value = raw.get(key)
            if value is None:
                out[key] = param.default
            elif not param.accepts(value):
                problems.append(f"{where}.{key} must be {param.what}, not {value!r}")
            else:
                out[key] = param.cast(value)
        if self.needs and not any(raw.get(k) is not None for k in self.needs):
            problems.append(f"{where} runs nothing without {' or '.join(self.needs)}")
        return out, problems

    def request(self, backbone: str, dataset: str, splits: Mapping[str, str | None], *,
                params: Mapping[str, Any] | None = None, features: FeatureSpec | str | None = None,
                seed: int = 0) -> TaskRequest:
        """A checked request: every role named, params complete with defaults (problems: one error)."""
        missing = [r for r in self.roles if not splits.get(r)]
        if missing:
            raise ProbeInputError(f"task {self.name} needs the split(s) {', '.join(missing)}")
        checked, problems = self.check_params({k: v for k, v in (params or {}).items()}, where=self.name)
        if problems:
            raise ProbeInputError("; ".join(problems))
        return TaskRequest(self.name, backbone, dataset, dict(splits), checked, FeatureSpec.of(features), seed)

    @property
    def ref_params(self) -> list[str]:
        return [k for k, p in self.params.items() if p.refs]


# ------------------------------------------------------------------ the registry
_TASKS: dict[str, Task] = {}


def _builtin() -> dict[str, Task]:
    """The registry, with the built-in tasks loaded (by name, once: their modules import this one)."""
    import importlib

    importlib.import_module("backbench.probe.builtin")
    return _TASKS


def register(task: Task) -> Task:
    """Add ``task`` to the registry (a later task of the same name replaces it); returns it."""
    _TASKS[task.name] = task
    return task


def registered() -> dict[str, Task]:
    """Every registered task by name, the built-in ones first."""
    return dict(_builtin())


def get_task(name: str) -> Task:
    tasks = _builtin()
    if name not in tasks:
        raise ProbeInputError(f"unknown task {name!r}; tasks are {', '.join(tasks)}")
    return tasks[name]


def run_task(cache: Any, request: TaskRequest, options: RunOptions | None = None) -> list[tuple[Record, bool]]:
    """Run ``request`` through its registered task: ``[(record, reused), ...]``."""
    return get_task(request.task).run(cache, request, options or RunOptions())


def logged(cache: Any, request: TaskRequest, record: Record, compute: Callable[[], Record],
           options: RunOptions) -> tuple[Record, bool]:
    """The results log's record for ``record`` (its key): reused unless ``options.force``, else
    computed and logged; a new record also carries the request's feature spec as its own field."""
    from backbench.store.results import ResultsLog

    return ResultsLog(cache).run(record, lambda: {"features": request.features.spec, **compute()},
                                 force=options.force)


def main_metric(task: str) -> str | None:
    """The metric a record of ``task`` (a task or record name) is ranked by, or None."""
    for t in _builtin().values():
        if task == t.name:
            return t.metric
        if task in t.records:
            return t.records[task]
    return None


def resampler(record: Record, outcomes: Mapping[str, Any]) -> Resampler | None:
    """The :class:`Resampler` of ``record`` from its outcome arrays, or None where its task keeps
    none (or the record predates them: ``outcomes`` empty)."""
    for t in _builtin().values():
        if record.get("task") == t.name or record.get("task") in t.records:
            return t.resample(record, outcomes) if (t.resample and outcomes) else None
    return None


# ------------------------------------------------------------------ what parameters accept
def is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def list_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and bool(v) and all(item(x) for x in v)


def is_ref(v: Any) -> bool:
    ds, sep, split = str(v).partition(":") if is_text(v) else ("", "", "")
    return bool(sep and ds and split)


POS_INT: Check = (lambda v: is_int(v, 1), "a positive integer", int)
INTS: Check = (list_of(lambda v: is_int(v, 1)), "a non-empty list of positive integers, e.g. [10, 20]",
               lambda v: [int(x) for x in v])
NUMBER: Check = (is_number, "a positive number, e.g. 0.07", float)
CS: Check = (list_of(is_number), "a non-empty list of positive numbers, e.g. [0.1, 1.0]",
             lambda v: [float(x) for x in v])
REFS: Check = (list_of(is_ref), 'a non-empty list of "DATASET:SPLIT" names, e.g. ["textures:test"]', list)
NAMES: Check = (list_of(is_text), 'a non-empty list of class names, e.g. ["8", "9"]', list)


def one_of(*options: str) -> Check:
    return (lambda v: v in options, " or ".join(options), str)
