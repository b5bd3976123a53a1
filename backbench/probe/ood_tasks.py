"""OOD detection, open-set detection and OOD generalization on the store, logged.

Detection fits each scorer on the ID train split and scores ID test against every OOD set
(any group of the same backbone; other weights or preprocessing are refused). Logit scores
use the ID linear probe and, where the cache holds them, the backbone's own classifier.

Outcomes (for the report's intervals, :mod:`backbench.probe.resample`): detection and
open-set keep the primary score's ``scores`` per image, ID test first, then each OOD set in
the record's ``outcome_sets`` order, with ``set`` (0 = ID, j = the j-th OOD set); shift keeps
``correct`` and ``predicted`` per image of every shifted split, ``set`` indexing
``outcome_sets``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe import resample
from backbench.probe.data import Split, check_same_backbone, load_split
from backbench.probe.resample import compact
from backbench.probe.tasks import read_splits
from backbench.store.cache import Cache
from backbench.tasks.base import (NAMES, REFS, FeatureSpec, Param, Record, RunOptions, Task, TaskRequest, logged,
                                  register, run_task)

DEFAULT_SCORES = ("knn", "msp", "maxlogit", "energy", "mahalanobis", "relative_mahalanobis", "vim", "cosine")
PRIMARY = "knn"  # the leaderboard's OOD number: Sun et al.'s label-free KNN distance


def _known_scores(v) -> bool:
    from backbench.probe.ood import SCORES

    return isinstance(v, (list, tuple)) and bool(v) and all(s in SCORES for s in v)


SCORE_NAMES = (_known_scores, "a non-empty list of OOD scores, " + ", ".join(DEFAULT_SCORES)
               + " (an unknown OOD score is refused)", list)


def parse_ref(ref: str) -> tuple[str, str]:
    ds, sep, split = str(ref).partition(":")
    if not sep or not ds or not split:
        raise ProbeInputError(f"{ref!r} is not DATASET:SPLIT (e.g. textures:test)")
    return ds, split


def _score_sets(scores: Sequence[str], train: Split, sets: dict[str, np.ndarray], device: str) -> dict[str, dict]:
    """Per score: fitted on ``train``, applied to each named feature matrix."""
    from backbench.probe.linear import select_and_fit
    from backbench.probe.ood import SCORES

    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ProbeInputError(f"unknown OOD score(s) {', '.join(unknown)}; choose from {', '.join(SCORES)}")
    probe = None
    out: dict[str, dict] = {}
    for name in scores:
        scorer = SCORES[name]()
        if hasattr(scorer, "probe"):
            if probe is None:
                probe, _ = select_and_fit(train.X, train.y, device=device)
            scorer.set_params(probe=probe)
        scorer.fit(train.X, train.y)
        out[name] = {k: scorer.score_samples(X) for k, X in sets.items()}
    return out


def _metrics(per_score: dict[str, dict[str, np.ndarray]], id_key: str) -> dict[str, Any]:
    from backbench.probe.ood_metrics import ood_metrics

    result: dict[str, Any] = {}
    for name, scored in per_score.items():
        per_set = {k: ood_metrics(scored[id_key], v) for k, v in scored.items() if k != id_key}
        keys = next(iter(per_set.values())).keys()
        result[name] = {**per_set, "mean": {m: float(np.mean([s[m] for s in per_set.values()])) for m in keys}}
    return result


def _primary_outcomes(scored: dict[str, np.ndarray], id_key: str) -> dict[str, np.ndarray]:
    """The primary score's per-image outcomes: ``scores`` of ID then each OOD set (in ``scored``'s
    order) concatenated, and ``set`` (0 = ID, j = the j-th OOD set)."""
    names = [id_key, *(k for k in scored if k != id_key)]
    return {"scores": np.concatenate([np.asarray(scored[k], dtype=np.float64) for k in names]),
            "set": np.concatenate([np.full(len(scored[k]), j, dtype=np.int16) for j, k in enumerate(names)])}


def _own_logit_scores(sets: dict[str, Split]) -> dict[str, dict[str, np.ndarray]]:
    from backbench.probe.ood import logit_scores

    if any(s.logits is None for s in sets.values()):
        return {}
    return {f"{kind}-backbone": {k: logit_scores(s.logits, kind) for k, s in sets.items()}
            for kind in ("msp", "maxlogit", "energy")}


def _ood(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """OOD detection against each ``ood`` set, and open-set detection of the ``open_set`` classes."""
    out = []
    if request.params.get("ood"):
        out.append(_detect(cache, request, options))
    if request.params.get("open_set"):
        out.append(_open_set(cache, request, options))
    return out


def _detect(cache: Cache, request: TaskRequest, options: RunOptions) -> tuple[Record, bool]:
    """ID test against each OOD set, for every score; AUROC etc. per set and averaged."""
    scores, ood = list(request.params["scores"] or DEFAULT_SCORES), list(request.params["ood"])
    b, spec = request.backbone, request.features.spec

    def read(dataset: str, split: str) -> Split:
        return load_split(cache, b, dataset, split, complete_only=options.complete_only, logits=True,
                          memory_limit=options.memory_limit, kind=spec)

    tr, te = read(request.dataset, request.splits["train"]), read(request.dataset, request.splits["eval"])
    outs = {f"{d}:{s}": read(d, s) for d, s in map(parse_ref, ood)}
    for other in (te, *outs.values()):
        check_same_backbone(tr, other)
    record = request.record({"train": tr.key, "test": te.key, **{k: v.key for k, v in outs.items()}},
                            task="ood", splits={"train": tr.name, "test": te.name},
                            params={"ood": ood, "scores": scores})

    def compute() -> Record:
        sets = {"id": te, **outs}
        per_score = _score_sets(scores, tr, {k: s.X for k, s in sets.items()}, options.device)
        per_score.update(_own_logit_scores(sets))
        metrics = _metrics(per_score, "id")
        primary = PRIMARY if PRIMARY in metrics else scores[0]
        return {"metrics": {"scores": metrics, "primary": primary, "auroc": metrics[primary]["mean"]["auroc"]},
                "outcome_sets": list(outs), "outcomes": _primary_outcomes(per_score[primary], "id")}

    return logged(cache, request, record, compute, options)


def _open_set(cache: Cache, request: TaskRequest, options: RunOptions) -> tuple[Record, bool]:
    """Hold out ``open_set`` classes as OOD: train on the rest, detect the held-out test images."""
    scores, holdout = list(request.params["scores"] or DEFAULT_SCORES), list(request.params["open_set"])
    tr, te = read_splits(cache, request, options, ("train", "eval"))
    missing = [c for c in holdout if c not in tr.classes]
    if missing or len(holdout) >= len(tr.classes) - 1:
        raise ProbeInputError(f"--open-set classes {missing or list(holdout)} must be classes of {request.dataset} "
                              f"({', '.join(tr.classes[:8])}...), leaving at least 2 ID classes")
    held = np.array([tr.classes.index(c) for c in holdout])
    record = request.record({tr.name: tr.key, te.name: te.key}, task="open-set",
                            splits={"train": tr.name, "test": te.name}, params={"holdout": holdout, "scores": scores})

    def compute() -> Record:
        keep_tr, id_te = ~np.isin(tr.y, held), ~np.isin(te.y, held)
        train_split = Split(tr.X[keep_tr], tr.y[keep_tr], tr.classes, tr.group, tr.name)
        sets = {"id": te.X[id_te], "held-out": te.X[~id_te]}
        per_score = _score_sets(scores, train_split, sets, options.device)
        metrics = _metrics(per_score, "id")
        primary = PRIMARY if PRIMARY in metrics else scores[0]
        return {"metrics": {"scores": metrics, "primary": primary, "auroc": metrics[primary]["mean"]["auroc"],
                            "n_id": int(id_te.sum()), "n_ood": int((~id_te).sum())},
                "outcome_sets": ["held-out"], "outcomes": _primary_outcomes(per_score[primary], "id")}

    return logged(cache, request, record, compute, options)


def _subset_accuracy(probe, split: Split, train_classes: list[str]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Accuracy on a shifted split whose classes are matched to the train classes by name:
    (summary, per-image ``correct``, per-image predicted train class)."""
    unknown = [c for c in split.classes if c not in train_classes]
    if unknown:
        raise ProbeInputError(f"{split.label} has classes the train split lacks: {unknown[:5]}")
    mapping = {c: train_classes.index(c) for c in split.classes}
    cols = sorted(set(mapping.values()))
    logits = probe.decision_function(split.X)
    order = list(probe.classes_.astype(int))
    sub = logits[:, [order.index(c) for c in cols]]
    pred = np.asarray(cols)[sub.argmax(1)]
    target = np.asarray([mapping[split.classes[i]] for i in split.y])
    correct = pred == target
    return ({"top1": float(correct.mean()), "n": int(len(target)), "classes": len(cols),
             "mapping": mapping if len(mapping) < len(train_classes) else "identity (all classes)"}, correct, pred)


def _shift(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """Fit the probe once on train; report ID accuracy, each shifted accuracy and the gap.

    ``eval`` is a split of the request's dataset or ``DATASET:SPLIT``; ``shifted`` names sets.
    """
    from backbench.probe.linear import select_and_fit

    b, spec = request.backbone, request.features.spec

    def read(dataset: str, split: str) -> Split:
        return load_split(cache, b, dataset, split, complete_only=options.complete_only,
                          memory_limit=options.memory_limit, kind=spec)

    train = (request.dataset, request.splits["train"])
    ev_ref = request.splits["eval"]
    eval_ = parse_ref(ev_ref) if ":" in ev_ref else (request.dataset, ev_ref)
    tr, ev = read(*train), read(*eval_)
    sh = {f"{d}:{s}": read(d, s) for d, s in map(parse_ref, request.params["shifted"])}
    for other in (ev, *sh.values()):
        check_same_backbone(tr, other)
    record = request.record({"train": tr.key, "eval": ev.key, **{k: v.key for k, v in sh.items()}},
                            splits={"train": train[1], "eval": f"{eval_[0]}:{eval_[1]}"}, params={"shifted": list(sh)})

    def compute() -> Record:
        probe, sweep = select_and_fit(tr.X, tr.y, device=options.device)
        id_acc = _subset_accuracy(probe, ev, tr.classes)[0]["top1"]
        done = {k: _subset_accuracy(probe, s, tr.classes) for k, s in sh.items()}
        per = {k: v[0] for k, v in done.items()}
        for v in per.values():
            v["gap"] = id_acc - v["top1"]
        mean = float(np.mean([v["top1"] for v in per.values()])) if per else float("nan")
        parts = list(done.values())
        outcomes = {"correct": np.concatenate([c for _, c, _ in parts]),
                    "predicted": compact(np.concatenate([p for _, _, p in parts])),
                    "set": np.concatenate([np.full(len(c), j, dtype=np.int16) for j, (_, c, _) in enumerate(parts)])}
        return {"chosen_C": sweep.best_C, "metrics": {"id_top1": id_acc, "shifted": per, "shifted_top1": mean,
                                                      "gap": id_acc - mean},
                "outcome_sets": list(done), "outcomes": outcomes}

    return [logged(cache, request, record, compute, options)]


OOD = register(Task("ood", _ood, {"ood": Param(None, *REFS, refs=True), "open_set": Param(None, *NAMES),
                                  "scores": Param(None, *SCORE_NAMES)},
                    needs=("ood", "open_set"), metric="auroc", records={"open-set": "auroc"}, cli="ood",
                    resample=resample.ood,
                    help="OOD detection: AUROC, AUPR-In/Out, FPR@95 of each score, ID test vs each OOD set."))
SHIFT = register(Task("shift", _shift, {"shifted": Param(None, *REFS, refs=True)}, needs=("shifted",),
                      metric="shifted_top1", cli="shift", resample=resample.shift,
                      help="OOD generalization: fit the probe once, report ID and shifted accuracy and the gap."))


def run_ood(cache: Cache, backbone: str, dataset: str, id_train: str, id_test: str, *, ood: Sequence[str],
            scores: Sequence[str] | None = None, features: FeatureSpec | str | None = None,
            memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
            complete_only: bool = False) -> tuple[Record, bool]:
    """OOD detection (:data:`OOD` with ``ood`` sets) with every input a parameter."""
    request = OOD.request(backbone, dataset, {"train": id_train, "eval": id_test},
                          params={"ood": list(ood), "scores": scores}, features=features)
    return _detect(cache, request, RunOptions(device, memory_limit, force, complete_only))


def run_open_set(cache: Cache, backbone: str, dataset: str, train: str, test: str, *, holdout: Sequence[str],
                 scores: Sequence[str] | None = None, features: FeatureSpec | str | None = None,
                 memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
                 complete_only: bool = False) -> tuple[Record, bool]:
    """Open-set detection (:data:`OOD` with ``open_set`` classes) with every input a parameter."""
    request = OOD.request(backbone, dataset, {"train": train, "eval": test},
                          params={"open_set": list(holdout), "scores": scores}, features=features)
    return _open_set(cache, request, RunOptions(device, memory_limit, force, complete_only))


def run_shift(cache: Cache, backbone: str, train: tuple[str, str], eval: tuple[str, str],
              shifted: Sequence[tuple[str, str]], *, features: FeatureSpec | str | None = None,
              memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
              complete_only: bool = False) -> tuple[Record, bool]:
    """:data:`SHIFT` with every input a parameter: ``(dataset, split)`` pairs."""
    request = SHIFT.request(backbone, train[0], {"train": train[1], "eval": f"{eval[0]}:{eval[1]}"},
                            params={"shifted": [f"{d}:{s}" for d, s in shifted]}, features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))[0]
