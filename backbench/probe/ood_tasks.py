"""OOD detection, open-set detection and OOD generalization on the store, logged.

Detection fits each scorer on the ID train split and scores ID test against every OOD set
(any group of the same backbone; other weights or preprocessing are refused). Logit scores
use the ID linear probe and, where the cache holds them, the backbone's own classifier.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe.data import Split, check_same_backbone, load_split
from backbench.probe.tasks import Record, base_request, load_pair
from backbench.report.results import ResultsLog
from backbench.store.cache import Cache

DEFAULT_SCORES = ("knn", "msp", "maxlogit", "energy", "mahalanobis", "relative_mahalanobis", "vim", "cosine")
PRIMARY = "knn"  # the leaderboard's OOD number: Sun et al.'s label-free KNN distance


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


def _own_logit_scores(sets: dict[str, Split]) -> dict[str, dict[str, np.ndarray]]:
    from backbench.probe.ood import logit_scores

    if any(s.logits is None for s in sets.values()):
        return {}
    return {f"{kind}-backbone": {k: logit_scores(s.logits, kind) for k, s in sets.items()}
            for kind in ("msp", "maxlogit", "energy")}


def run_ood(cache: Cache, backbone: str, dataset: str, id_train: str, id_test: str, *, ood: Sequence[str],
            scores: Sequence[str] | None = None, device: str = "cpu", force: bool = False,
            complete_only: bool = False) -> tuple[Record, bool]:
    """ID test against each OOD set, for every score; AUROC etc. per set and averaged."""
    scores = list(scores or DEFAULT_SCORES)
    tr = load_split(cache, backbone, dataset, id_train, complete_only=complete_only, logits=True)
    te = load_split(cache, backbone, dataset, id_test, complete_only=complete_only, logits=True)
    outs = {f"{d}:{s}": load_split(cache, backbone, d, s, complete_only=complete_only, logits=True)
            for d, s in map(parse_ref, ood)}
    for other in (te, *outs.values()):
        check_same_backbone(tr, other)
    request = base_request("ood", backbone, dataset, {"train": id_train, "test": id_test}, [tr, te, *outs.values()],
                           {"ood": list(ood), "scores": scores}, 0)
    request["groups"] = {"train": tr.key, "test": te.key, **{k: v.key for k, v in outs.items()}}

    def compute() -> Record:
        sets = {"id": te, **outs}
        per_score = _score_sets(scores, tr, {k: s.X for k, s in sets.items()}, device)
        per_score.update(_own_logit_scores(sets))
        metrics = _metrics(per_score, "id")
        primary = PRIMARY if PRIMARY in metrics else scores[0]
        return {"metrics": {"scores": metrics, "primary": primary, "auroc": metrics[primary]["mean"]["auroc"]}}

    return ResultsLog(cache).run(request, compute, force=force)


def run_open_set(cache: Cache, backbone: str, dataset: str, train: str, test: str, *, holdout: Sequence[str],
                 scores: Sequence[str] | None = None, device: str = "cpu", force: bool = False,
                 complete_only: bool = False) -> tuple[Record, bool]:
    """Hold out ``holdout`` classes as OOD: train on the rest, detect the held-out test images."""
    scores = list(scores or DEFAULT_SCORES)
    tr, (te,) = load_pair(cache, backbone, dataset, train, [test], complete_only=complete_only)
    missing = [c for c in holdout if c not in tr.classes]
    if missing or len(holdout) >= len(tr.classes) - 1:
        raise ProbeInputError(f"--open-set classes {missing or list(holdout)} must be classes of {dataset} "
                              f"({', '.join(tr.classes[:8])}...), leaving at least 2 ID classes")
    held = np.array([tr.classes.index(c) for c in holdout])
    request = base_request("open-set", backbone, dataset, {"train": train, "test": test}, [tr, te],
                           {"holdout": list(holdout), "scores": scores}, 0)

    def compute() -> Record:
        keep_tr, id_te = ~np.isin(tr.y, held), ~np.isin(te.y, held)
        train_split = Split(tr.X[keep_tr], tr.y[keep_tr], tr.classes, tr.group, tr.name)
        sets = {"id": te.X[id_te], "held-out": te.X[~id_te]}
        metrics = _metrics(_score_sets(scores, train_split, sets, device), "id")
        primary = PRIMARY if PRIMARY in metrics else scores[0]
        return {"metrics": {"scores": metrics, "primary": primary, "auroc": metrics[primary]["mean"]["auroc"],
                            "n_id": int(id_te.sum()), "n_ood": int((~id_te).sum())}}

    return ResultsLog(cache).run(request, compute, force=force)


def _subset_accuracy(probe, split: Split, train_classes: list[str]) -> dict[str, Any]:
    """Accuracy on a shifted split whose classes are matched to the train classes by name."""
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
    return {"top1": float((pred == target).mean()), "n": int(len(target)), "classes": len(cols),
            "mapping": mapping if len(mapping) < len(train_classes) else "identity (all classes)"}


def run_shift(cache: Cache, backbone: str, train: tuple[str, str], eval: tuple[str, str],
              shifted: Sequence[tuple[str, str]], *, device: str = "cpu", force: bool = False,
              complete_only: bool = False) -> tuple[Record, bool]:
    """Fit the probe once on train; report ID accuracy, each shifted accuracy and the gap."""
    from backbench.probe.linear import select_and_fit

    tr = load_split(cache, backbone, *train, complete_only=complete_only)
    ev = load_split(cache, backbone, *eval, complete_only=complete_only)
    sh = {f"{d}:{s}": load_split(cache, backbone, d, s, complete_only=complete_only) for d, s in shifted}
    for other in (ev, *sh.values()):
        check_same_backbone(tr, other)
    request = base_request("shift", backbone, train[0], {"train": train[1], "eval": f"{eval[0]}:{eval[1]}"},
                           [tr, ev, *sh.values()], {"shifted": list(sh)}, 0)
    request["groups"] = {"train": tr.key, "eval": ev.key, **{k: v.key for k, v in sh.items()}}

    def compute() -> Record:
        probe, sweep = select_and_fit(tr.X, tr.y, device=device)
        id_acc = _subset_accuracy(probe, ev, tr.classes)["top1"]
        per = {k: _subset_accuracy(probe, s, tr.classes) for k, s in sh.items()}
        for v in per.values():
            v["gap"] = id_acc - v["top1"]
        mean = float(np.mean([v["top1"] for v in per.values()])) if per else float("nan")
        return {"chosen_C": sweep.best_C, "metrics": {"id_top1": id_acc, "shifted": per, "shifted_top1": mean,
                                                      "gap": id_acc - mean}}

    return ResultsLog(cache).run(request, compute, force=force)
