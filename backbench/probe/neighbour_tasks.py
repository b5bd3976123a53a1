"""kNN classification and retrieval on the store, logged like the probe.

A retrieval gallery whose float32 copy would not fit in the memory left is added to the
faiss index chunk by chunk straight from the Zarr array, never read whole as raw features.
"""

from __future__ import annotations

from typing import Any, Sequence


from backbench.probe.data import Split, check_same_backbone, load_split
from backbench.probe.tasks import Record, base_request, load_pair
from backbench.report.results import ResultsLog
from backbench.store.cache import Cache
from backbench.store.group import FeatureGroup

MAIN_K = 20


def fits_in_memory(group: FeatureGroup) -> bool:
    """Whether a float32 copy of the group's features fits the memory limit in force."""
    from backbench.probe.stream import memory_limit

    return group.n * group.dim * 4 <= memory_limit()


def _knn_metrics(train_X, train_y, ev: Split, ks: Sequence[int], temperature: float, n_classes: int,
                 device: str) -> dict[str, Any]:
    from backbench.probe.knn import knn_eval

    n = int(train_X.shape[0])
    used = sorted({min(int(k), n) for k in ks})  # a k beyond the gallery is reported as the k used
    m = knn_eval(train_X, train_y, ev.X, ev.y, ks=used, temperature=temperature, n_classes=n_classes, device=device)
    main = min(MAIN_K if MAIN_K in ks else min(ks), n)
    metrics = {**m, "top1": m[f"top1@{main}"], "top5": m.get(f"top5@{main}"), "main_k": main}
    return {"metrics": metrics, "ks_used": used, "k_clipped": {str(k): n for k in ks if k > n}}


def run_knn(cache: Cache, backbone: str, dataset: str, train: str, eval: str, *, ks: Sequence[int] = (10, 20, 100, 200),
            temperature: float = 0.07, shots: Sequence[int] | None = None, seeds: int = 3, device: str = "cpu",
            force: bool = False, complete_only: bool = False) -> list[tuple[Record, bool]]:
    """DINO-style weighted kNN; with ``shots``, K train images per class per seed (train only).

    A k larger than the gallery (the train rows that vote) uses the whole gallery and is
    reported under the k used: ``top1@{n}``; the record's ``ks_used`` lists the ks used and
    its ``k_clipped`` maps each k asked for to the one used (metrics stay numbers only).
    """
    from backbench.probe.fewshot import few_shot_indices

    ks = sorted({int(k) for k in ks})
    tr, (ev,) = load_pair(cache, backbone, dataset, train, [eval], complete_only=complete_only)
    log, n_classes, out = ResultsLog(cache), len(tr.classes), []
    params = {"ks": ks, "temperature": float(temperature)}
    if not shots:
        request = base_request("knn", backbone, dataset, {"train": train, "eval": eval}, [tr, ev], params, 0)
        out.append(log.run(request, lambda: _knn_metrics(tr.X, tr.y, ev, ks, temperature, n_classes, device),
                           force=force))
        return out
    for k in shots:
        for seed in range(seeds):
            request = base_request("knn-fewshot", backbone, dataset, {"train": train, "eval": eval}, [tr, ev],
                                   {**params, "shots": int(k)}, seed)

            def compute(k: int = int(k), seed: int = seed) -> Record:
                idx = few_shot_indices(tr.y, k, seed, class_names=tr.classes)
                return {"train_rows": idx.tolist(),
                        **_knn_metrics(tr.X[idx], tr.y[idx], ev, ks, temperature, n_classes, device)}

            out.append(log.run(request, compute, force=force))
    return out


def run_retrieval(cache: Cache, backbone: str, dataset: str, query: str, gallery: str, *,
                  ks: Sequence[int] = (1, 5, 10), index: str = "flat", device: str = "cpu", force: bool = False,
                  complete_only: bool = False) -> tuple[Record, bool]:
    """Same-label retrieval; a query never retrieves itself when query and gallery are one split."""
    from backbench.probe.retrieval import build_index, retrieval_metrics

    ks = sorted({int(k) for k in ks})
    q = load_split(cache, backbone, dataset, query, complete_only=complete_only)
    same = query == gallery
    from backbench.extract.kinds import probe_kinds
    from backbench.probe.data import current_features

    kinds = probe_kinds(current_features())
    stream = not same and len(kinds) == 1 and not fits_in_memory(cache.group(backbone, dataset, gallery, kinds[0]))
    g = q if same else load_split(cache, backbone, dataset, gallery, complete_only=complete_only,
                                  memory_limit=0 if stream else None)
    check_same_backbone(q, g)
    request = base_request("retrieval", backbone, dataset, {"query": query, "gallery": gallery}, [q, g],
                           {"ks": ks, "index": index}, 0)

    def compute() -> Record:
        # a gallery bigger than memory is read chunk by chunk into the faiss index (skipped rows dropped)
        gallery_X: Any = build_index(g.X, index=index, device=device) if stream else g.X
        return {"metrics": retrieval_metrics(q.X, q.y, gallery_X, g.y, ks=ks, exclude_self=same, index=index,
                                             device=device)}

    return ResultsLog(cache).run(request, compute, force=force)
