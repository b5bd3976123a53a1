"""kNN classification and retrieval on the store, logged like the probe.

A retrieval gallery whose float32 copy would not fit in the memory left is added to the
faiss index chunk by chunk straight from the Zarr array, never read whole as raw features.

Outcomes (for the report's intervals, :mod:`backbench.probe.resample`): kNN keeps
``correct`` and ``predicted`` per eval image at its main k; retrieval keeps, per query with a
relevant item, ``query`` (its row), ``ap`` (exact index: the mean is mAP), ``ap_topk`` and
``first_hit`` (0-based rank of the first relevant item, -1 if none is retrieved).
"""

from __future__ import annotations

from typing import Any, Sequence

from backbench.probe import resample
from backbench.probe.data import Split, check_same_backbone, load_split
from backbench.probe.resample import compact
from backbench.probe.tasks import read_splits
from backbench.store.cache import Cache
from backbench.tasks.base import (INTS, NUMBER, POS_INT, FeatureSpec, Param, Record, RunOptions, Task, TaskRequest,
                                  logged, one_of, register, run_task)

MAIN_K = 20


def _knn_metrics(train_X, train_y, ev: Split, ks: Sequence[int], temperature: float, n_classes: int,
                 device: str) -> dict[str, Any]:
    from backbench.probe.knn import knn_eval

    n = int(train_X.shape[0])
    used = sorted({min(int(k), n) for k in ks})  # a k beyond the gallery is reported as the k used
    main = min(MAIN_K if MAIN_K in ks else min(ks), n)
    m, outcomes = knn_eval(train_X, train_y, ev.X, ev.y, ks=used, temperature=temperature, n_classes=n_classes,
                           device=device, outcomes_at=main)
    metrics = {**m, "top1": m[f"top1@{main}"], "top5": m.get(f"top5@{main}"), "main_k": main}
    return {"metrics": metrics, "ks_used": used, "k_clipped": {str(k): n for k in ks if k > n},
            "outcomes": {"correct": outcomes["correct"], "predicted": compact(outcomes["predicted"])}}


def _knn(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """DINO-style weighted kNN; with ``shots``, K train images per class per seed (train only).

    A k larger than the gallery (the train rows that vote) uses the whole gallery and is
    reported under the k used: ``top1@{n}``; the record's ``ks_used`` lists the ks used and
    its ``k_clipped`` maps each k asked for to the one used (metrics stay numbers only).
    """
    from backbench.probe.fewshot import few_shot_indices

    ks, temperature = sorted({int(k) for k in request.params["k"]}), float(request.params["temperature"])
    tr, ev = read_splits(cache, request, options, ("train", "eval"))
    n_classes = len(tr.classes)
    params, groups = {"ks": ks, "temperature": temperature}, {tr.name: tr.key, ev.name: ev.key}
    if request.task == "knn":
        record = request.record(groups, params=params)
        return [logged(cache, request, record,
                       lambda: _knn_metrics(tr.X, tr.y, ev, ks, temperature, n_classes, options.device), options)]
    out = []
    for k in request.params["shots"]:
        for seed in range(request.params["seeds"]):
            record = request.record(groups, params={**params, "shots": int(k)}, seed=seed)

            def compute(k: int = int(k), seed: int = seed) -> Record:
                idx = few_shot_indices(tr.y, k, seed, class_names=tr.classes)
                return {"train_rows": idx.tolist(),
                        **_knn_metrics(tr.X[idx], tr.y[idx], ev, ks, temperature, n_classes, options.device)}

            out.append(logged(cache, request, record, compute, options))
    return out


def _retrieval(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """Same-label retrieval: queries from ``eval``, the gallery from ``train``; a query never
    retrieves itself when both are one split. Outcomes: per query with a relevant item, its
    ``ap`` (flat index; the mean is mAP), ``ap_topk``, ``first_hit`` rank and ``query`` row."""
    from backbench.probe.retrieval import build_index, retrieval_metrics
    from backbench.probe.stream import resolve_memory_limit

    ks, index = sorted({int(k) for k in request.params["ks"]}), request.params["index"]
    query, gallery = request.splits["eval"], request.splits["train"]
    spec, limit = request.features, resolve_memory_limit(options.memory_limit)
    q = load_split(cache, request.backbone, request.dataset, query, complete_only=options.complete_only,
                   memory_limit=limit, kind=spec.spec)
    same = query == gallery
    size = cache.group(request.backbone, request.dataset, gallery, spec.kinds[0])
    stream = not same and len(spec.kinds) == 1 and size.n * size.dim * 4 > limit
    g = q if same else load_split(cache, request.backbone, request.dataset, gallery, kind=spec.spec,
                                  complete_only=options.complete_only, memory_limit=0 if stream else limit)
    check_same_backbone(q, g)
    record = request.record({q.name: q.key, g.name: g.key}, splits={"query": query, "gallery": gallery},
                            params={"ks": ks, "index": index})

    def compute() -> Record:
        # a gallery bigger than memory is read chunk by chunk into the faiss index (skipped rows dropped)
        gallery_X: Any = build_index(g.X, index=index, device=options.device) if stream else g.X
        metrics, outcomes = retrieval_metrics(q.X, q.y, gallery_X, g.y, ks=ks, exclude_self=same, index=index,
                                              device=options.device, outcomes=True)
        return {"metrics": metrics, "outcomes": outcomes}

    return [logged(cache, request, record, compute, options)]


_K = {"k": Param([10, 20, 100, 200], *INTS), "temperature": Param(0.07, *NUMBER)}
KNN = register(Task("knn", _knn, _K, metric="top1", cli="knn", resample=resample.classification,
                    help="Weighted kNN classification (DINO's vote, cosine similarity, faiss) on cached features."))
KNN_FEWSHOT = register(Task("knn-fewshot", _knn, {**_K, "shots": Param([1, 2, 4, 8, 16], *INTS),
                                                  "seeds": Param(3, *POS_INT)}, metric="top1", cli="knn",
                            resample=resample.classification,
                            help="kNN with K train images per class, per seed."))
RETRIEVAL = register(Task("retrieval", _retrieval, {"ks": Param([1, 5, 10], *INTS),
                                                    "index": Param("flat", *one_of("flat", "ivf", "hnsw"))},
                          metric="mAP", cli="retrieve", resample=resample.retrieval,
                          help="Image retrieval (relevant = same label): mAP, P@k, R@k, MRR."))


def run_knn(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, ks: Sequence[int] = (10, 20, 100, 200),
            temperature: float = 0.07, shots: Sequence[int] | None = None, seeds: int = 3,
            features: FeatureSpec | str | None = None, memory_limit: int | str | None = None, device: str = "cpu",
            force: bool = False, complete_only: bool = False) -> list[tuple[Record, bool]]:
    """:data:`KNN` (or, with ``shots``, :data:`KNN_FEWSHOT`) with every input a parameter."""
    task = KNN_FEWSHOT if shots else KNN
    params = {"k": list(ks), "temperature": temperature, **({"shots": list(shots), "seeds": seeds} if shots else {})}
    request = task.request(backbone, dataset, {"train": train, "eval": eval}, params=params, features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))


def run_retrieval(cache: Cache, backbone: str, dataset: str, query: str, gallery: str, *,
                  ks: Sequence[int] = (1, 5, 10), index: str = "flat", features: FeatureSpec | str | None = None,
                  memory_limit: int | str | None = None, device: str = "cpu", force: bool = False,
                  complete_only: bool = False) -> tuple[Record, bool]:
    """:data:`RETRIEVAL` with every input a parameter: ``query`` and ``gallery`` splits."""
    request = RETRIEVAL.request(backbone, dataset, {"train": gallery, "eval": query},
                                params={"ks": list(ks), "index": index}, features=features)
    return run_task(cache, request, RunOptions(device, memory_limit, force, complete_only))[0]
