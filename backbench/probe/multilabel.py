"""The multi-label linear probe: one-vs-rest logistic regression, scored by mean AUROC.

Battle of the Backbones reports mean AUROC over CheXpert's labels. A multi-label group (a
``csv:`` source with ``--labels``) stores each row's labels as a bitmask over its classes;
here they become a 0/1 matrix, every label gets its own binary :class:`LinearProbe`, one
``C`` shared by all labels is chosen by the mean AUROC on val (else a seeded 10 % holdout of
train), and the refit on train (+ val) is scored with scikit-learn's ``roc_auc_score`` and
``average_precision_score`` per label. A label without both classes where it is fitted or
scored is left out, and the record says which. The record keeps the eval ``scores`` (n, labels;
float64, as scored: nan for a label without a probe) and ``targets`` (bool) as outcome arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe import resample
from backbench.tasks.base import (CS, FeatureSpec, Param, Record, RunOptions, Task, TaskRequest, logged, register,
                                  run_task)


def label_matrix(masks: np.ndarray, n_labels: int) -> np.ndarray:
    """Bitmask labels (n,) -> 0/1 matrix (n, n_labels)."""
    return ((np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(n_labels)) & 1).astype(np.int8)


def _both(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < len(y)


def _fit(X, Y, C: float, labels: Sequence[int], device: str) -> dict[int, Any]:
    from backbench.probe.linear import LinearProbe

    return {k: LinearProbe(C, device=device).fit(X, Y[:, k]) for k in labels}


def _scores(models: dict[int, Any], X) -> dict[int, np.ndarray]:
    return {k: m.predict_proba(X)[:, list(m.classes_).index(1)] for k, m in models.items()}


def mean_auroc(Y: np.ndarray, scores: dict[int, np.ndarray]) -> tuple[float, dict[int, float]]:
    from sklearn.metrics import roc_auc_score

    per = {k: float(roc_auc_score(Y[:, k], s)) for k, s in scores.items() if _both(Y[:, k])}
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def fit_multilabel(X, Y: np.ndarray, Cs: Sequence[float], *, X_val=None, Y_val=None, seed: int = 0,
                   device: str = "cpu", holdout: float = 0.1) -> tuple[dict[int, Any], dict[str, Any]]:
    """``(models per label, sweep)``: ``C`` chosen by mean AUROC, then refit on train (+ val)."""
    Cs = sorted(float(c) for c in Cs)
    if X_val is None:
        rng = np.random.default_rng(seed)
        held = np.sort(rng.choice(len(Y), size=max(1, int(np.ceil(holdout * len(Y)))), replace=False))
        fit = np.setdiff1d(np.arange(len(Y)), held)
        X_fit, Y_fit, X_sel, Y_sel = X[fit], Y[fit], X[held], Y[held]
    else:
        X_fit, Y_fit, X_sel, Y_sel = X, Y, X_val, Y_val
    labels = [k for k in range(Y.shape[1]) if _both(Y_fit[:, k]) and _both(Y_sel[:, k])]
    if not labels:
        raise ProbeInputError("no label has both positives and negatives in the rows fitted and those used to "
                              "select C; a multi-label probe needs more data (or a --val split)")
    sel = [mean_auroc(Y_sel, _scores(_fit(X_fit, Y_fit, C, labels, device), X_sel))[0] for C in Cs]
    best = int(np.nanargmax(sel))
    X_all = X if X_val is None else np.concatenate([X, X_val])
    Y_all = Y if X_val is None else np.concatenate([Y, Y_val])
    final = [k for k in range(Y.shape[1]) if _both(Y_all[:, k])]
    models = _fit(X_all, Y_all, Cs[best], final, device)
    return models, {"Cs": Cs, "mean_auroc": sel, "best_C": Cs[best], "selection": "val" if X_val is not None
                    else "holdout-10%"}


def _multilabel_probe(cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """The probe for multi-label groups: one-vs-rest, C chosen by mean AUROC, scored per label."""
    from sklearn.metrics import average_precision_score

    from backbench.probe.grid import default_Cs
    from backbench.probe.tasks import read_splits

    Cs = [float(c) for c in (request.params.get("C") or default_Cs())]
    tr, ev, vl = read_splits(cache, request, options, multilabel=True)
    names, K = tr.classes, len(tr.classes)
    record = request.record({s.name: s.key for s in (tr, ev, vl) if s is not None}, task="probe-multilabel",
                            params={"Cs": Cs, "selection": "val" if vl is not None else "holdout-10%"})

    def compute() -> dict[str, Any]:
        X, Y = np.asarray(tr.X[:]), label_matrix(tr.y, K)
        Xv, Yv = (np.asarray(vl.X[:]), label_matrix(vl.y, K)) if vl is not None else (None, None)
        models, sweep = fit_multilabel(X, Y, Cs, X_val=Xv, Y_val=Yv, device=options.device)
        Ye = label_matrix(ev.y, K)
        scores = _scores(models, np.asarray(ev.X[:]))
        mean, per = mean_auroc(Ye, scores)
        ap = {k: float(average_precision_score(Ye[:, k], s)) for k, s in scores.items() if _both(Ye[:, k])}
        table = np.full(Ye.shape, np.nan)  # a label without a fitted probe keeps nan scores
        for k, s in scores.items():
            table[:, k] = s
        return {"outcomes": {"scores": table, "targets": Ye.astype(bool)},"chosen_C": sweep["best_C"], "sweep": sweep,
                "metrics": {"mean_auroc": mean, "auroc": {names[k]: v for k, v in per.items()},
                            "mean_ap": float(np.mean(list(ap.values()))) if ap else float("nan"),
                            "labels_scored": [names[k] for k in per], "n_labels": K,
                            "positives_eval": {names[k]: int(Ye[:, k].sum()) for k in range(K)}}}

    return [logged(cache, request, record, compute, options)]


MULTILABEL = register(Task("probe-multilabel", _multilabel_probe, {"C": Param(None, *CS)}, optional_roles=("val",),
                           metric="mean_auroc", cli="probe", resample=resample.multilabel,
                           help="One-vs-rest linear probe of a multi-label dataset (mean AUROC)."))


def run_multilabel_probe(cache, backbone: str, dataset: str, train: str, eval: str, *, val: str | None = None,
                         Cs: Sequence[float] | None = None, features: FeatureSpec | str | None = None,
                         memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
                         complete_only: bool = False):
    """:data:`MULTILABEL` with every input a parameter; returns (record, reused)."""
    request = MULTILABEL.request(backbone, dataset, {"train": train, "eval": eval, "val": val}, params={"C": Cs},
                                 features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))[0]
