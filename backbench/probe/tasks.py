"""Linear-probe tasks on the store: the full-data probe and the few-shot probe.

The pure layer is :mod:`backbench.probe.linear` (arrays in, estimator out); this layer
reads the splits a :class:`~backbench.tasks.base.TaskRequest` names, fits, evaluates and
logs one record per (task, seed); :mod:`backbench.cli` and the battle build the requests.
Each record keeps ``correct`` and ``predicted`` per eval image as outcome arrays, from which
the report bootstraps top-1 (:mod:`backbench.probe.resample`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe import resample
from backbench.probe.data import Split, check_same_backbone, check_same_classes, load_split
from backbench.store.cache import Cache
from backbench.tasks.base import (CS, INTS, POS_INT, FeatureSpec, Param, Record, RunOptions, Task, TaskRequest,
                                  logged, register, run_task)


def load_pair(cache: Cache, backbone: str, dataset: str, train: str, evals: Sequence[str], *,
              features: FeatureSpec | str | None = None, memory_limit: int | str | None = None,
              complete_only: bool = False, multilabel: bool = False) -> tuple[Split, list[Split]]:
    """Train split plus eval splits of one backbone and dataset, checked to fit together.

    All are streamed (lazy :class:`~backbench.probe.stream.GroupRows`) when their float32
    features together exceed the memory limit, else all are read into memory.
    """
    from backbench.probe.stream import resolve_memory_limit

    spec = FeatureSpec.of(features)
    sizes = [(g.n, g.dim) for s in [train, *evals] for g in (cache.group(backbone, dataset, s, k) for k in spec.kinds)]
    need = sum(n * d * 4 for n, d in sizes)
    limit = 0 if need > resolve_memory_limit(memory_limit) else need
    tr, *others = [load_split(cache, backbone, dataset, s, complete_only=complete_only, memory_limit=limit,
                              kind=spec.spec) for s in [train, *evals]]
    for other in others:
        check_same_backbone(tr, other)
        check_same_classes(tr, other)
    if bool(tr.group.attrs.get("multilabel")) != multilabel:
        raise ProbeInputError(
            f"{tr.label} is multi-label: `backbench probe` runs its one-vs-rest probe (mean AUROC); the other "
            f"tasks need one label per image" if not multilabel else f"{tr.label} has one label per image")
    return tr, others


def read_splits(cache: Cache, request: TaskRequest, options: RunOptions, roles: Sequence[str] = ("train", "eval", "val"),
                *, multilabel: bool = False) -> list[Split | None]:
    """The request's splits for ``roles`` (a role it leaves empty comes back as None)."""
    names = [request.splits.get(r) for r in roles]
    tr, others = load_pair(cache, request.backbone, request.dataset, names[0], [n for n in names[1:] if n],
                           features=request.features, memory_limit=options.memory_limit,
                           complete_only=options.complete_only, multilabel=multilabel)
    it = iter(others)
    return [tr, *[next(it) if n else None for n in names[1:]]]


def _evaluate(model, split: Split) -> dict[str, Any]:
    """The metrics of ``model`` on ``split`` and its per-image outcomes: ``correct`` (top-1 is
    its mean) and ``predicted`` (the argmax the metrics use)."""
    from backbench.probe.metrics import classification_metrics

    proba = np.zeros((len(split.y), len(split.classes)), dtype=np.float64)
    proba[:, model.classes_.astype(int)] = model.predict_proba(split.X)
    predicted = proba.argmax(1)
    return {"metrics": classification_metrics(split.y, proba, labels=np.arange(len(split.classes))),
            "outcomes": {"correct": predicted == np.asarray(split.y), "predicted": resample.compact(predicted)}}


def _fit(tr_X, tr_y, Cs, val: Split | None, seed: int, device: str):
    from backbench.probe.linear import select_and_fit

    if val is None:
        return select_and_fit(tr_X, tr_y, Cs, seed=seed, device=device)
    return select_and_fit(tr_X, tr_y, Cs, X_val=val.X, y_val=val.y, seed=seed, device=device)


def _grid(request: TaskRequest) -> list[float]:
    from backbench.probe.grid import default_Cs

    return [float(c) for c in (request.params.get("C") or default_Cs())]


def _groups(splits: Sequence[Split | None]) -> dict[str, str]:
    """What a record keys on besides the request: each split's cache key (by split name)."""
    return {s.name: s.key for s in splits if s is not None}


def _probe(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """The full-data linear probe: select C (on val, else a 10% holdout), refit, evaluate."""
    first = cache.group(request.backbone, request.dataset, request.splits["train"], request.features.kinds[0])
    if first.attrs.get("multilabel"):  # a multi-label group has its own task
        return run_task(cache, TaskRequest("probe-multilabel", request.backbone, request.dataset, request.splits,
                                           request.params, request.features), options)
    Cs = _grid(request)
    tr, ev, vl = read_splits(cache, request, options)
    val = request.splits.get("val")
    record = request.record(_groups([tr, ev, vl]), params={"Cs": Cs, "selection": "val" if val else "holdout-10%"})

    def compute() -> Record:
        model, sweep = _fit(tr.X, tr.y, Cs, vl, 0, options.device)
        return {"chosen_C": sweep.best_C, "sweep": sweep.to_dict(), **_evaluate(model, ev),
                "standardization": {"mean_norm": float(np.linalg.norm(model.mean_)),
                                    "scale_mean": float(np.mean(model.scale_))}}

    return [logged(cache, request, record, compute, options)]


def _few_shot(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """K images per class drawn from train only, per seed; C selected on val or on the shots."""
    from backbench.probe.fewshot import few_shot_indices

    Cs = _grid(request)
    tr, ev, vl = read_splits(cache, request, options)
    out = []
    for k in request.params["shots"]:
        for seed in range(request.params["seeds"]):
            record = request.record(_groups([tr, ev, vl]), seed=seed, params={"Cs": Cs, "shots": int(k)})

            def compute(k: int = int(k), seed: int = seed) -> Record:
                idx = few_shot_indices(tr.y, k, seed, class_names=tr.classes)
                model, sweep = _fit(tr.X[idx], tr.y[idx], Cs, vl, seed, options.device)
                return {"chosen_C": sweep.best_C, "train_rows": idx.tolist(), **_evaluate(model, ev)}

            out.append(logged(cache, request, record, compute, options))
    return out


PROBE = register(Task("probe", _probe, {"C": Param(None, *CS)}, optional_roles=("val",), metric="top1", cli="probe",
                      resample=resample.classification,
                      help="Linear probe (L2 logistic regression, C swept) on cached features."))
FEWSHOT = register(Task("fewshot", _few_shot, {"shots": Param([1, 2, 4, 8, 16], *INTS), "seeds": Param(3, *POS_INT),
                                               "C": Param(None, *CS)},
                        optional_roles=("val",), metric="top1", cli="probe",
                        resample=resample.classification,
                        help="Few-shot linear probe: K train images per class, per seed."))


def run_probe(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, val: str | None = None,
              Cs: Sequence[float] | None = None, features: FeatureSpec | str | None = None,
              memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
              complete_only: bool = False) -> tuple[Record, bool]:
    """:data:`PROBE` with every input a parameter. Returns (record, reused)."""
    request = PROBE.request(backbone, dataset, {"train": train, "eval": eval, "val": val}, params={"C": Cs},
                            features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))[0]


def run_few_shot(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, shots: Sequence[int],
                 seeds: int = 3, val: str | None = None, Cs: Sequence[float] | None = None,
                 features: FeatureSpec | str | None = None, memory_limit: int | str | None = None,
                 device: str = "cpu", force: bool = False, complete_only: bool = False) -> list[tuple[Record, bool]]:
    """:data:`FEWSHOT` with every input a parameter: one (record, reused) per shots x seed."""
    request = FEWSHOT.request(backbone, dataset, {"train": train, "eval": eval, "val": val},
                              params={"shots": list(shots), "seeds": seeds, "C": Cs}, features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))


def summarize_few_shot(records: Sequence[Record], metric: str = "top1") -> list[dict[str, Any]]:
    """Mean and std over seeds, per number of shots."""
    by_k: dict[int, list[float]] = {}
    for r in records:
        by_k.setdefault(int(r["params"]["shots"]), []).append(float(r["metrics"][metric]))
    return [{"shots": k, f"{metric}_mean": float(np.mean(v)), f"{metric}_std": float(np.std(v)), "seeds": len(v)}
            for k, v in sorted(by_k.items())]
