"""Clustering on cached features, as MIEB (mteb's image benchmark) scores it.

The protocol: k-means with k = the number of classes present in the evaluated split, on
L2-normalised features (spherical k-means: unit centroids, assignment by cosine similarity),
run once per seed; each run's assignments are scored against the labels with NMI, ARI and
V-measure (scikit-learn's ``normalized_mutual_info_score``, ``adjusted_rand_score``,
``v_measure_score``) and the Hungarian-matched cluster accuracy; the record holds the mean and
standard deviation over seeds, and keeps each seed's ``assignments`` and the ``labels`` as
outcome arrays (the report bootstraps NMI from them). MIEB ranks its image clustering tasks by
NMI (``main_score = "nmi"``), and so does the leaderboard here. MIEB fits scikit-learn's MiniBatchKMeans once;
backbench fits faiss's k-means (full batch, ``niter`` Lloyd iterations, started from
scikit-learn's k-means++ seeding) over several seeds, so that a backbone's score does not hang
on one initialisation.

Memory: each seed trains on at most ``points_per_centroid * k`` rows (faiss's own default
sample, drawn here with the seed so a streamed split and an in-memory one train on the same
rows); every row is then assigned to its nearest centroid one block at a time, in one pass
over the cache for all seeds. A split above the memory limit is read as a lazy
:class:`~backbench.probe.stream.GroupRows` and never held whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError
from backbench.probe import resample
from backbench.probe.blocks import iter_blocks, l2_normalize
from backbench.probe.resample import compact
from backbench.store.cache import Cache
from backbench.tasks.base import POS_INT, Param, Record, RunOptions, Task, TaskRequest, logged, register

METRICS = ("nmi", "ari", "v_measure", "cluster_acc")
POINTS_PER_CENTROID = 256  # faiss's default training sample per centroid
BLOCK_ROWS = 8192


@dataclass
class Clustering:
    """The assignments of each seed's k-means (``(seeds, n)`` int32) and each seed's scores."""

    n_clusters: int
    assignments: np.ndarray
    per_seed: list[dict[str, float]] = field(default_factory=list)
    train_sizes: list[int] = field(default_factory=list)  # rows each seed's k-means was fitted on

    @property
    def metrics(self) -> dict[str, float]:
        """Mean and (population) standard deviation over seeds of each score."""
        out: dict[str, float] = {}
        for name in METRICS:
            values = np.array([s[name] for s in self.per_seed], dtype=np.float64)
            out[name], out[f"{name}_std"] = float(values.mean()), float(values.std())
        return out


def cluster_scores(labels: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    """NMI, ARI, V-measure (scikit-learn) and the Hungarian-matched accuracy of one clustering."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels, assignments)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {"nmi": float(normalized_mutual_info_score(labels, assignments)),
            "ari": float(adjusted_rand_score(labels, assignments)),
            "v_measure": float(v_measure_score(labels, assignments)),
            "cluster_acc": float(table[rows, cols].sum() / len(labels))}


def _train_sample(X: Any, n_clusters: int, points_per_centroid: int, seed: int) -> np.ndarray:
    """Sorted positions of the rows one seed's k-means trains on (all rows when few enough)."""
    n, most = int(X.shape[0]), points_per_centroid * n_clusters
    if n <= most:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, most, replace=False)).astype(np.int64)


def _centroids(X: Any, rows: np.ndarray, n_clusters: int, *, niter: int, seed: int, device: str) -> np.ndarray:
    """Unit centroids of spherical faiss k-means fitted on the L2-normalised ``X[rows]``, started
    from k-means++ (faiss starts from random rows, which leaves two centroids in one blob often
    enough to make a seed's score a coin toss)."""
    from sklearn.cluster import kmeans_plusplus

    from backbench.probe.search import import_faiss

    faiss = import_faiss()
    sample = l2_normalize(np.array(X[rows], dtype=np.float32, order="C", copy=True))
    gpu = str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(sample.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, gpu=gpu,
                      min_points_per_centroid=1, max_points_per_centroid=max(1, -(-len(sample) // n_clusters)))
    # scikit-learn's k-means++ seeding, in float64: on float32 it upcasts block by block, 5x slower
    init, _ = kmeans_plusplus(sample.astype(np.float64), n_clusters, random_state=seed)
    km.train(sample, init_centroids=l2_normalize(np.ascontiguousarray(init, dtype=np.float32)))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def kmeans_cluster(X: Any, labels: np.ndarray, *, seeds: int = 3, niter: int = 25,
                   points_per_centroid: int = POINTS_PER_CENTROID, n_clusters: int | None = None,
                   device: str = "cpu", block_rows: int = BLOCK_ROWS) -> Clustering:
    """Spherical k-means of the rows of ``X`` (a numpy array or a lazy ``GroupRows``), once per
    seed ``0 .. seeds-1``, scored against ``labels``; k defaults to the number of distinct labels."""
    from backbench.probe.search import flat_index

    labels = np.asarray(labels)
    n = int(X.shape[0])
    if len(labels) != n:
        raise ProbeInputError(f"{n} rows of features but {len(labels)} labels")
    k = int(n_clusters or len(np.unique(labels)))
    if k < 2 or n < k:
        raise ProbeInputError(f"clustering needs at least 2 classes and as many rows as clusters; got {k} "
                              f"class(es) and {n} row(s)")
    samples = [_train_sample(X, k, points_per_centroid, seed) for seed in range(seeds)]
    indexes = []
    for seed, rows in enumerate(samples):
        index = flat_index(X.shape[1], device)
        index.add(_centroids(X, rows, k, niter=niter, seed=seed, device=device))
        indexes.append(index)
    assignments = np.empty((seeds, n), dtype=np.int32)
    for start, block in iter_blocks(X, block_rows, dtype=np.float32, normalize=True, stored_chunks=True,
                                    check_finite=True):
        for s, index in enumerate(indexes):
            assignments[s, start:start + len(block)] = index.search(block, 1)[1][:, 0]
    return Clustering(k, assignments, [cluster_scores(labels, a) for a in assignments],
                      [len(r) for r in samples])


# --------------------------------------------------------------------------- the task
def _cluster(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """k-means on the ``eval`` split (k = its number of classes), scored against its labels."""
    from backbench.probe.data import load_split
    from backbench.probe.stream import resolve_memory_limit

    split = request.splits["eval"]
    ev = load_split(cache, request.backbone, request.dataset, split, complete_only=options.complete_only,
                    memory_limit=resolve_memory_limit(options.memory_limit), kind=request.features.spec)
    if ev.group.attrs.get("multilabel"):
        raise ProbeInputError(f"{ev.label} is multi-label: clustering needs one label per image")
    params = {k: int(request.params[k]) for k in ("seeds", "niter", "points_per_centroid")}
    record = request.record({ev.name: ev.key}, splits={"eval": split}, params={**params, "spherical": True})

    def compute() -> Record:
        result = kmeans_cluster(ev.X, ev.y, device=options.device, **params)
        return {"metrics": {**result.metrics, "n_clusters": result.n_clusters, "n": len(ev.y)},
                "per_seed": result.per_seed, "train_sizes": result.train_sizes,
                "streamed": not isinstance(ev.X, np.ndarray),
                "outcomes": {"assignments": result.assignments, "labels": compact(ev.y)}}

    return [logged(cache, request, record, compute, options)]


CLUSTERING = register(Task(
    "clustering", _cluster,
    {"seeds": Param(3, *POS_INT), "niter": Param(25, *POS_INT), "points_per_centroid": Param(POINTS_PER_CENTROID,
                                                                                              *POS_INT)},
    roles=("eval",), metric="nmi", cli="cluster", resample=resample.clustering,
    help="k-means (k = classes, faiss, spherical, several seeds) on cached features: NMI, ARI, V-measure."))
