"""Probe tasks on the store: read splits, fit, evaluate, log one record per (task, seed).

The pure layer is :mod:`backbench.probe.linear` (arrays in, estimator out); this layer
adds the cache, the protocol and the results log; :mod:`backbench.cli` adds the command.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.probe.data import Split, check_same_backbone, check_same_classes, load_split
from backbench.report.results import ResultsLog
from backbench.store.cache import Cache

Record = dict[str, Any]


def load_pair(cache: Cache, backbone: str, dataset: str, train: str, evals: Sequence[str], *,
              complete_only: bool = False, multilabel: bool = False) -> tuple[Split, list[Split]]:
    """Train split plus eval splits of one backbone and dataset, checked to fit together.

    All are streamed (lazy :class:`~backbench.probe.stream.GroupRows`) when their float32
    features together exceed the memory limit, else all are read into memory.
    """
    from backbench.probe.stream import memory_limit

    from backbench.extract.kinds import probe_kinds
    from backbench.probe.data import current_features

    sizes = [(g.n, g.dim) for s in [train, *evals] for g in
             (cache.group(backbone, dataset, s, k) for k in probe_kinds(current_features()))]
    need = sum(n * d * 4 for n, d in sizes)
    limit = 0 if need > memory_limit() else need
    tr = load_split(cache, backbone, dataset, train, complete_only=complete_only, memory_limit=limit)
    others = [load_split(cache, backbone, dataset, s, complete_only=complete_only, memory_limit=limit)
              for s in evals]
    for other in others:
        check_same_backbone(tr, other)
        check_same_classes(tr, other)
    if bool(tr.group.attrs.get("multilabel")) != multilabel:
        from backbench.errors import ProbeInputError

        raise ProbeInputError(
            f"{tr.label} is multi-label: `backbench probe` runs its one-vs-rest probe (mean AUROC); the other "
            f"tasks need one label per image" if not multilabel else f"{tr.label} has one label per image")
    return tr, others


def base_request(task: str, backbone: str, dataset: str, splits: dict[str, str | None],
                 groups: Sequence[Split], params: dict[str, Any], seed: int) -> Record:
    from backbench.probe.data import current_features

    kind = current_features()  # other feature kinds rank as their own rows: "NAME#cls"
    backbone = backbone if kind == "pooled" else f"{backbone}#{kind}"
    return {"task": task, "backbone": backbone, "dataset": dataset, "splits": splits, "params": params,
            "seed": seed, "groups": {s.name: s.key for s in groups}}


def _evaluate(model, split: Split) -> dict[str, Any]:
    from backbench.probe.metrics import classification_metrics

    proba = np.zeros((len(split.y), len(split.classes)), dtype=np.float64)
    proba[:, model.classes_.astype(int)] = model.predict_proba(split.X)
    return classification_metrics(split.y, proba, labels=np.arange(len(split.classes)))


def _fit(tr_X, tr_y, Cs, val: Split | None, seed: int, device: str):
    from backbench.probe.linear import select_and_fit

    if val is None:
        return select_and_fit(tr_X, tr_y, Cs, seed=seed, device=device)
    return select_and_fit(tr_X, tr_y, Cs, X_val=val.X, y_val=val.y, seed=seed, device=device)


def run_probe(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, val: str | None = None,
              Cs: Sequence[float] | None = None, device: str = "cpu", force: bool = False,
              complete_only: bool = False) -> tuple[Record, bool]:
    """The full-data linear probe: select C, refit, evaluate. Returns (record, reused)."""
    from backbench.probe.linear import default_Cs

    from backbench.extract.kinds import probe_kinds
    from backbench.probe.data import current_features

    if cache.group(backbone, dataset, train, probe_kinds(current_features())[0]).attrs.get("multilabel"):
        from backbench.probe.multilabel import run_multilabel_probe

        return run_multilabel_probe(cache, backbone, dataset, train, eval, val=val, Cs=Cs, device=device,
                                    force=force, complete_only=complete_only)
    Cs = [float(c) for c in (Cs if Cs is not None else default_Cs())]
    tr, others = load_pair(cache, backbone, dataset, train, [eval] + ([val] if val else []),
                           complete_only=complete_only)
    ev, vl = others[0], (others[1] if val else None)
    request = base_request("probe", backbone, dataset, {"train": train, "eval": eval, "val": val},
                           [tr, *others], {"Cs": Cs, "selection": "val" if val else "holdout-10%"}, 0)

    def compute() -> Record:
        model, sweep = _fit(tr.X, tr.y, Cs, vl, 0, device)
        return {"chosen_C": sweep.best_C, "sweep": sweep.to_dict(), "metrics": _evaluate(model, ev),
                "standardization": {"mean_norm": float(np.linalg.norm(model.mean_)),
                                    "scale_mean": float(np.mean(model.scale_))}}

    return ResultsLog(cache).run(request, compute, force=force)


def run_few_shot(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, shots: Sequence[int],
                 seeds: int = 3, val: str | None = None, Cs: Sequence[float] | None = None, device: str = "cpu",
                 force: bool = False, complete_only: bool = False) -> list[tuple[Record, bool]]:
    """K images per class drawn from train only, per seed; C selected on val or on the shots."""
    from backbench.probe.fewshot import few_shot_indices
    from backbench.probe.linear import default_Cs

    Cs = [float(c) for c in (Cs if Cs is not None else default_Cs())]
    tr, others = load_pair(cache, backbone, dataset, train, [eval] + ([val] if val else []),
                           complete_only=complete_only)
    ev, vl = others[0], (others[1] if val else None)
    log, out = ResultsLog(cache), []
    for k in shots:
        for seed in range(seeds):
            request = base_request("fewshot", backbone, dataset, {"train": train, "eval": eval, "val": val},
                                   [tr, *others], {"Cs": Cs, "shots": int(k)}, seed)

            def compute(k: int = int(k), seed: int = seed) -> Record:
                idx = few_shot_indices(tr.y, k, seed, class_names=tr.classes)
                model, sweep = _fit(tr.X[idx], tr.y[idx], Cs, vl, seed, device)
                return {"chosen_C": sweep.best_C, "train_rows": idx.tolist(), "metrics": _evaluate(model, ev)}

            out.append(log.run(request, compute, force=force))
    return out


def summarize_few_shot(records: Sequence[Record], metric: str = "top1") -> list[dict[str, Any]]:
    """Mean and std over seeds, per number of shots."""
    by_k: dict[int, list[float]] = {}
    for r in records:
        by_k.setdefault(int(r["params"]["shots"]), []).append(float(r["metrics"][metric]))
    return [{"shots": k, f"{metric}_mean": float(np.mean(v)), f"{metric}_std": float(np.std(v)), "seeds": len(v)}
            for k, v in sorted(by_k.items())]
