"""Image retrieval on frozen features: rank a gallery by cosine similarity, relevance = same label.

``index="flat"`` ranks the whole gallery exactly, one chunk of queries at a time (chunk x
gallery similarities, then a sort), so mAP covers every relevant item and no queries x
gallery matrix is ever held. ``index="ivf"`` / ``"hnsw"`` use approximate faiss indexes for
large galleries: metrics then cover the top ``K`` retrieved items and ``recall_vs_exact``
says how much of the exact top ``K`` the index found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe.knn import check_features, flat_index, import_faiss, iter_normalized, to_device
from backbench.probe.resample import compact

INDEX_KINDS = ("flat", "ivf", "hnsw")
_EXACT_CELLS = 1 << 23  # similarities per exact-ranking chunk (32 MB as float32)


def _gallery_chunks(gallery: Any, batch_size: int) -> Iterator[np.ndarray]:
    """Normalized float32 chunks from a 2-D array or an iterable of 2-D chunks."""
    if hasattr(gallery, "shape"):
        yield from (c for _, c in iter_normalized(check_features(gallery, "gallery"), batch_size))
        return
    for chunk in gallery:
        yield from (c for _, c in iter_normalized(check_features(chunk, "gallery chunk"), batch_size))


def _ivf(first: np.ndarray, rest: Iterator[np.ndarray], nlist: int | None, n_total: int | None,
         train_rows: int | None) -> tuple[Any, list[np.ndarray]]:
    """A trained IndexIVFFlat (spherical k-means) and the chunks buffered to train it."""
    faiss, d = import_faiss(), first.shape[1]
    guess = (nlist or round(math.sqrt(n_total))) if (nlist or n_total) else None
    limit = train_rows or (max(40 * guess, 50_000) if guess else 100_000)
    buf, n_buf = [first], len(first)
    while n_buf < limit and (chunk := next(rest, None)) is not None:
        buf.append(chunk)
        n_buf += len(chunk)
    # sqrt(rows) lists, at most one per 39 training rows (faiss's minimum for k-means)
    nlist = max(1, min(nlist or min(round(math.sqrt(n_total or n_buf)), n_buf // 39), n_buf))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.train(np.concatenate(buf)[:limit])
    return index, buf


def build_index(
    gallery: Any,
    *,
    index: str = "flat",
    nlist: int | None = None,
    n_total: int | None = None,
    train_rows: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    device: str = "cpu",
    batch_size: int = 16384,
) -> Any:
    """A faiss inner-product index over the L2-normalized rows of ``gallery``.

    ``gallery`` is a 2-D array (numpy, zarr, h5py: read ``batch_size`` rows at a time) or any
    iterable of 2-D chunks, e.g. a generator over a Zarr cache, so the gallery is never held
    whole as raw features. ``"ivf"`` trains on the first ``train_rows`` rows (default
    max(40 * nlist, 50,000)) with ``nlist`` = sqrt(rows) unless given; pass ``n_total`` when
    the chunks come from an iterator. HNSW indexes stay on the CPU.
    """
    if index not in INDEX_KINDS:
        raise ProbeInputError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if n_total is None and hasattr(gallery, "shape"):
        n_total = int(gallery.shape[0])
    chunks = _gallery_chunks(gallery, batch_size)
    first = next(chunks, None)
    if first is None:
        raise ProbeInputError("the gallery is empty: give at least one row of features")
    buffered: Iterable[np.ndarray] = [first]
    if index == "flat":
        built = flat_index(first.shape[1], device)
    elif index == "hnsw":
        faiss = import_faiss()
        built = faiss.IndexHNSWFlat(first.shape[1], int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efConstruction = int(ef_construction)
    else:
        built, buffered = _ivf(first, chunks, nlist, n_total, train_rows)
        built = to_device(built, device)
    for chunk in buffered:
        built.add(chunk)
    for chunk in chunks:
        built.add(chunk)
    return built


# --------------------------------------------------------------------------- index helpers


def index_kind(index: Any) -> str:
    """"flat", "ivf" or "hnsw" for a faiss index (CPU or GPU)."""
    faiss = import_faiss()
    name = type(faiss.downcast_index(index) if isinstance(index, faiss.Index) else index).__name__
    for kind, tag in (("hnsw", "HNSW"), ("ivf", "IVF"), ("flat", "Flat")):
        if tag in name:
            return kind
    raise ProbeInputError(f"unsupported faiss index {name}: use build_index(..., index='flat'|'ivf'|'hnsw')")


def _search_params(index: Any, kind: str, nprobe: int | None, ef_search: int | None, exact: bool = False) -> Any:
    """faiss SearchParameters for ``kind``; ``exact`` probes every IVF list."""
    faiss = import_faiss()
    if kind == "ivf":
        ivf = faiss.downcast_index(index)
        lists = ivf.nlist if hasattr(ivf, "nlist") else ivf.getNumLists()  # CPU / GPU IVF
        return faiss.SearchParametersIVF(nprobe=int(lists if exact else min(nprobe or 16, lists)))
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(ef_search or 128))
    return None


def _exact_searcher(index: Any, kind: str) -> tuple[Any, Any]:
    """An (index, params) pair that searches the same vectors exactly."""
    faiss = import_faiss()
    if kind == "hnsw":
        return faiss.downcast_index(faiss.downcast_index(index).storage), None
    if kind == "ivf":
        return index, _search_params(index, kind, None, None, exact=True)
    return index, None


def _flat_vectors(index: Any) -> np.ndarray:
    """The (n, d) float32 vectors stored in a flat index, without a copy for CPU indexes."""
    faiss = import_faiss()
    if not isinstance(index, faiss.IndexFlat):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


# --------------------------------------------------------------------------- ranking metrics


def _drop_self(idx: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Neighbour ids minus each query's own id (query i is gallery i), one column fewer."""
    keep = idx != self_ids[:, None]
    keep[keep.all(axis=1), -1] = False  # self not retrieved: drop the last hit instead
    return idx[keep].reshape(len(idx), idx.shape[1] - 1)


def _per_query(rel: np.ndarray, hits: np.ndarray, n_rel: np.ndarray, K: int, full: bool) -> dict[str, np.ndarray]:
    """Per query, from boolean relevance rows in rank order (``hits``: their cumulative sums):
    ``ap_topk`` (AP over the top K, normalized by min(relevant, K)), ``ap`` (over the full
    ranking; ``full`` only) and ``first_hit`` (0-based rank of the first relevant item, -1 if
    none is ranked)."""
    n = rel.shape[0]
    r, c = np.nonzero(rel)
    prec = hits[r, c] / (c + 1.0)  # precision at each relevant item's rank
    top = c < K
    out = {"ap_topk": np.bincount(r[top], prec[top], n) / np.minimum(n_rel, K)}
    if full:
        out["ap"] = np.bincount(r, prec, n) / n_rel
    out["first_hit"] = np.where(hits[:, -1] > 0, rel.argmax(axis=1), -1)
    return out


def _ranked_sums(rel: np.ndarray, n_rel: np.ndarray, ks: Sequence[int], K: int, full: bool,
                 per: dict[str, list[np.ndarray]] | None = None) -> dict[str, float]:
    """Sums over queries of each metric, from boolean relevance rows in rank order; the
    per-query values (:func:`_per_query`) are appended to ``per`` when given."""
    width = rel.shape[1]
    hits = rel.cumsum(axis=1, dtype=np.int32)
    q = _per_query(rel, hits, n_rel, K, full)
    if per is not None:
        for key, value in q.items():
            per.setdefault(key, []).append(value)
    out = {f"mAP@{K}": float(q["ap_topk"].sum())}
    if full:
        out["mAP"] = float(q["ap"].sum())
    found = q["first_hit"] >= 0
    out["MRR" if full else f"MRR@{K}"] = float((1.0 / (q["first_hit"][found] + 1)).sum())
    for k in ks:
        at_k = hits[:, min(k, width) - 1]
        out[f"precision@{k}"] = float(at_k.sum() / k)
        out[f"recall@{k}"] = float((at_k > 0).sum())
    return out


def _accumulate(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def _exact_sums(queries: Iterator[tuple[slice, np.ndarray]], gallery: np.ndarray, q_lab: np.ndarray,
                g_lab: np.ndarray, n_rel: np.ndarray, ks: Sequence[int], K: int, exclude_self: bool,
                device: str, per: dict[str, list[np.ndarray]] | None = None) -> dict[str, float]:
    """Metric sums over queries that have a relevant item, ranking the whole gallery."""
    import torch

    dev = torch.device(device if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu")
    g_t = torch.from_numpy(gallery).to(dev) if dev.type == "cuda" else None
    g_lab_t = torch.from_numpy(g_lab).to(dev)
    total: dict[str, float] = {}
    for rows, q in queries:
        sims = torch.from_numpy(q).to(dev) @ g_t.T if g_t is not None else torch.from_numpy(q @ gallery.T)
        if exclude_self:  # own row sorts last, then is cut off
            sims[torch.arange(len(q)), torch.arange(rows.start, rows.stop)] = -torch.inf
        order = torch.sort(sims, dim=1, descending=True).indices
        rel = (g_lab_t[order] == torch.from_numpy(q_lab[rows]).to(dev)[:, None]).cpu().numpy()
        if exclude_self:
            rel = rel[:, :-1]
        ok = n_rel[rows] > 0
        _accumulate(total, _ranked_sums(rel[ok], n_rel[rows][ok], ks, K, full=True, per=per))
    return total


def _overlap(approx: np.ndarray, exact: np.ndarray) -> int:
    """Number of exact neighbour ids that also appear in the approximate row, summed over rows."""
    return int((exact[:, :, None] == approx[:, None, :]).any(axis=2).sum())


def _approx_sums(index: Any, kind: str, params: Any, queries: Iterator[tuple[slice, np.ndarray]],
                 q_lab: np.ndarray, g_lab: np.ndarray, n_rel: np.ndarray, ks: Sequence[int], K: int,
                 exclude_self: bool, sample: np.ndarray,
                 per: dict[str, list[np.ndarray]] | None = None) -> tuple[dict[str, float], int]:
    """Metric sums over the top ``K`` of an approximate index, and its overlap with the exact
    top ``K`` on the ``sample`` query rows."""
    exact_index, exact_params = _exact_searcher(index, kind)
    total: dict[str, float] = {}
    overlap = 0
    for rows, q in queries:
        ids = np.arange(rows.start, rows.stop)
        _, idx = index.search(q, K + exclude_self, params=params)
        picked = np.flatnonzero(np.isin(ids, sample))
        if exclude_self:
            idx = _drop_self(idx, ids)
        if len(picked):
            _, ref = exact_index.search(q[picked], K + exclude_self, params=exact_params)
            overlap += _overlap(idx[picked], _drop_self(ref, ids[picked]) if exclude_self else ref)
        rel = (idx >= 0) & (g_lab[np.maximum(idx, 0)] == q_lab[rows][:, None])
        ok = n_rel[rows] > 0
        _accumulate(total, _ranked_sums(rel[ok], n_rel[rows][ok], ks, K, full=False, per=per))
    return total, overlap


def _relevance(query_y: Any, gallery_y: Any, n_q: int, n_gal: int,
               exclude_self: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared integer label codes for queries and gallery, and each query's number of
    relevant gallery items (same label, its own row aside when ``exclude_self``)."""
    query_y, gallery_y = np.asarray(query_y), np.asarray(gallery_y)
    if query_y.shape != (n_q,) or gallery_y.shape != (n_gal,):
        raise ProbeInputError(f"need one label per query ({n_q}) and per gallery item ({n_gal})")
    if exclude_self and n_q != n_gal:
        raise ProbeInputError("exclude_self=True needs the same rows as queries and gallery (query i = gallery i)")
    classes = np.unique(np.concatenate([query_y, gallery_y]))
    q_lab, g_lab = (np.searchsorted(classes, y).astype(np.int32) for y in (query_y, gallery_y))
    n_rel = np.bincount(g_lab, minlength=len(classes))[q_lab] - int(exclude_self)
    if not (n_rel > 0).any():
        raise ProbeInputError("no query has a relevant gallery item (same label): check the labels")
    return q_lab, g_lab, n_rel


def retrieval_metrics(
    query_X: Any,
    query_y: Any,
    gallery_X: Any,
    gallery_y: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    index: str = "flat",
    topk: int = 100,
    batch_size: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    recall_queries: int = 1000,
    device: str = "cpu",
    outcomes: bool = False,
) -> dict | tuple[dict, dict[str, np.ndarray]]:
    """Retrieval quality of cosine similarity, an item being relevant when its label matches.

    ``gallery_X`` is a 2-D array, or a faiss index from :func:`build_index` (its kind then
    overrides ``index``). ``exclude_self`` treats query i as gallery i and never retrieves it.
    Averages run over the queries that have at least one relevant gallery item. Keys:
    ``precision@{k}`` and ``recall@{k}`` (share of queries with a relevant item in the top k)
    for each k, ``mAP@{K}`` (AP over the top K = max(topk, max(ks)), normalized by
    min(relevant, K)) and ``recall_vs_exact`` (share of the exact top K an approximate index
    returns, on up to ``recall_queries`` evenly spaced queries; 1.0 for flat). Flat adds
    ``mAP`` and ``MRR`` over the full ranking; ivf / hnsw add ``MRR@{K}`` instead. Also
    ``n_queries``, ``n_queries_no_relevant``, ``index``. ``nprobe`` (ivf, default 16) and
    ``ef_search`` (hnsw, default 128) trade speed for recall.

    With ``outcomes``, returns ``(metrics, per-query arrays)`` over the queries averaged
    (those with a relevant item, in query order): ``query`` (their rows), ``ap`` (flat: its
    mean is ``mAP``), ``ap_topk`` (its mean is ``mAP@{K}``) and ``first_hit`` (0-based rank of
    the first relevant item, -1 if none is retrieved).
    """
    faiss = import_faiss()
    query_X = check_features(query_X, "query_X")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or int(topk) < 1:
        raise ProbeInputError(f"ks and topk must be positive integers, got ks={ks!r}, topk={topk!r}")
    built = gallery_X if isinstance(gallery_X, faiss.Index) else build_index(
        gallery_X, index=index, device="cpu" if index == "flat" else device)
    kind, n_gal, n_q = index_kind(built), int(built.ntotal), query_X.shape[0]
    if built.d != query_X.shape[1]:
        raise ProbeInputError(f"queries have {query_X.shape[1]} features, the gallery {built.d}")
    q_lab, g_lab, n_rel = _relevance(query_y, gallery_y, n_q, n_gal, exclude_self)
    n_valid, K = int((n_rel > 0).sum()), min(max(int(topk), ks[-1]), n_gal - int(exclude_self))
    per: dict[str, list[np.ndarray]] | None = {} if outcomes else None
    if kind == "flat":
        bs = batch_size or max(1, _EXACT_CELLS // n_gal)
        sums = _exact_sums(iter_normalized(query_X, bs), _flat_vectors(built), q_lab, g_lab, n_rel,
                           ks, K, exclude_self, device, per)
        recall = 1.0
    else:
        sample = np.unique(np.linspace(0, n_q - 1, min(n_q, max(1, int(recall_queries)))).astype(np.int64))
        params = _search_params(built, kind, nprobe, ef_search)
        sums, overlap = _approx_sums(built, kind, params, iter_normalized(query_X, batch_size or 4096),
                                     q_lab, g_lab, n_rel, ks, K, exclude_self, sample, per)
        recall = overlap / (len(sample) * K)
    out: dict[str, Any] = {key: value / n_valid for key, value in sums.items()}
    out.update(recall_vs_exact=float(recall), n_queries=n_valid, n_queries_no_relevant=n_q - n_valid, index=kind)
    if per is None:
        return out
    arrays = {key: np.concatenate(parts) for key, parts in per.items()}
    arrays["first_hit"] = compact(arrays["first_hit"])
    return out, {"query": compact(np.flatnonzero(n_rel > 0)), **arrays}
