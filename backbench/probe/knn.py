"""kNN classification on frozen features: DINO's temperature-weighted vote.

Train features are L2-normalized, so inner product is cosine similarity, and searched exactly:
on CPU by default through ``Int8FlatIndex`` (``search="fast"``: an int8 matrix product picks
candidates, exact float32 dot products rank them, and a query whose result the int8 rounding
could have changed is searched again exactly), else by a faiss ``IndexFlatIP``
(``search="exact"``, and on GPU). Queries are searched in chunks of ``batch_size`` rows, so
memory never holds a queries x train matrix. Features may be any 2-D array-like that slices by
rows (numpy, zarr, h5py): only one chunk is converted to float32 at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from backbench.errors import ProbeInputError
from backbench.probe.search import (  # noqa: F401  (re-exported: retrieval, ood and tests use them)
    SEARCHES,
    Int8FlatIndex,
    add_normalized,
    check_features,
    flat_index,
    import_faiss,
    iter_normalized,
    knn_index,
    l2_normalize,
    normalized_rows,
    to_device,
)

# --------------------------------------------------------------------------- voting


def vote_weights(sims: np.ndarray, temperature: float, weights: str = "softmax") -> np.ndarray:
    """DINO's neighbour weights exp(sim / T), or ones for ``weights="uniform"``.

    Each row is shifted by its top similarity first: the weights are scaled by a per-row
    constant, which changes neither the vote nor normalized probabilities, and cannot overflow.
    """
    if weights == "uniform":
        return np.ones(sims.shape, dtype=np.float64)
    if weights != "softmax":
        raise ProbeInputError(f"weights must be 'softmax' or 'uniform', got {weights!r}")
    if temperature <= 0:
        raise ProbeInputError(f"temperature must be positive, got {temperature}")
    sims = sims.astype(np.float64)
    return np.exp((sims - sims[:, :1]) / temperature)


def class_votes(weights: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_classes) sums of neighbour weights per class; ``labels`` are codes in [0, n_classes)."""
    n = weights.shape[0]
    flat = (np.arange(n)[:, None] * n_classes + labels).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=n * n_classes).reshape(n, n_classes)


def _topk_rows(votes: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: does its label rank first / within the first five by votes?

    Ties rank the smaller class code first (as ``argmax`` does); a class with no vote at all
    never counts as a hit.
    """
    true = votes[np.arange(len(y)), y][:, None]
    ahead = (votes > true).sum(1) + ((votes == true) & (np.arange(votes.shape[1]) < y[:, None])).sum(1)
    voted = true[:, 0] > 0
    return (ahead == 0) & voted, (ahead < 5) & voted


def _topk_hits(votes: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """Counts of rows whose label ranks first / within the first five (:func:`_topk_rows`)."""
    top1, top5 = _topk_rows(votes, y)
    return int(top1.sum()), int(top5.sum())


# --------------------------------------------------------------------------- estimator


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on cosine similarity with DINO's weighted vote.

    ``weights="softmax"`` weighs each of the ``k`` neighbours by exp(sim / temperature)
    (DINO, DINOv2); ``weights="uniform"`` is a plain majority vote, as scikit-learn's
    ``KNeighborsClassifier`` does by default. Ties go to the first class in ``classes_``.
    ``search`` picks the neighbour search (``"auto"``: ``"fast"`` on CPU, faiss on GPU); both
    find the exact neighbours, see ``Int8FlatIndex``.
    """

    def __init__(
        self,
        k: int = 20,
        *,
        temperature: float = 0.07,
        weights: str = "softmax",
        device: str = "cpu",
        batch_size: int = 4096,
        search: str = "auto",
    ) -> None:
        self.k = k
        self.temperature = temperature
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.search = search

    def fit(self, X: Any, y: Any) -> KNNClassifier:
        """Index the L2-normalized rows of ``X``; ``y`` holds their labels."""
        X = check_features(X)
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ProbeInputError(f"y must have one label per row of X ({X.shape[0]}), got shape {y.shape}")
        if int(self.k) < 1:
            raise ProbeInputError(f"k must be a positive integer, got {self.k}")
        self.classes_, self.train_labels_ = np.unique(y, return_inverse=True)
        self.index_ = knn_index(X, device=self.device, search=self.search, batch_size=self.batch_size)
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = X.shape[0]
        return self

    def _chunks(self, X: Any) -> Iterator[tuple[slice, np.ndarray]]:
        check_is_fitted(self, "index_")
        X = check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ProbeInputError(f"X has {X.shape[1]} features but the classifier was fit on {self.n_features_in_}")
        return iter_normalized(X, self.batch_size)

    def _k(self, k: int | None) -> int:
        check_is_fitted(self, "index_")
        return min(int(k or self.k), self.n_samples_fit_)

    def kneighbors(self, X: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (descending) and train-row indices of each row's ``k`` neighbours."""
        k = self._k(k)
        parts = [self.index_.search(q, k) for _, q in self._chunks(X)]
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def _votes(self, X: Any) -> np.ndarray:
        k, out = self._k(None), []
        for _, q in self._chunks(X):
            sims, idx = self.index_.search(q, k)
            w = vote_weights(sims, self.temperature, self.weights)
            out.append(class_votes(w, self.train_labels_[idx], len(self.classes_)))
        return np.concatenate(out)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Per-class share of the neighbours' vote weight, columns in ``classes_`` order."""
        votes = self._votes(X)
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The class with the largest vote for each row of ``X``."""
        return self.classes_[np.argmax(self._votes(X), axis=1)]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # may be self.__dict__ itself
        if "index_" in state and not isinstance(state["index_"], Int8FlatIndex):
            faiss = import_faiss()  # faiss indexes are not picklable; store faiss's own bytes
            index = state["index_"]
            if not isinstance(index, faiss.IndexFlat):
                index = faiss.index_gpu_to_cpu(index)
            state["index_"] = faiss.serialize_index(index)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("index_"), np.ndarray):
            state["index_"] = to_device(import_faiss().deserialize_index(state["index_"]), state["device"])
        super().__setstate__(state)


# --------------------------------------------------------------------------- evaluation


def _encode_labels(train_y: Any, eval_y: Any, n_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer class codes for both label arrays and the number of classes."""
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    if n_classes is None:
        classes = np.unique(np.concatenate([train_y, eval_y]))
        return np.searchsorted(classes, train_y), np.searchsorted(classes, eval_y), len(classes)
    for y in (train_y, eval_y):
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
            raise ProbeInputError(f"with n_classes={n_classes} labels must be integers in [0, {n_classes})")
    return train_y.astype(np.int64), eval_y.astype(np.int64), int(n_classes)


STREAM_QUERIES = 32768  # queries per pass over a streamed train set (heap: 12 bytes x k each)


def knn_eval(
    train_X: Any,
    train_y: Any,
    eval_X: Any,
    eval_y: Any,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_classes: int | None = None,
    device: str = "cpu",
    *,
    batch_size: int = 4096,
    search: str = "auto",
    outcomes_at: int | None = None,
) -> dict | tuple[dict, dict[str, np.ndarray]]:
    """Top-1 and top-5 accuracy of DINO's weighted kNN vote for every k, from one search.

    Each eval chunk is searched once at max(ks); every k votes with the first k of those
    neighbours. k larger than the train set is clipped to it (its key still names the k asked:
    ``run_knn``, which records and prints results, clips the ks first so that every key names
    the k actually used); ``search`` as in ``KNNClassifier``.
    Returns ``{"top1@{k}": acc, "top5@{k}": acc, ..., "n_train", "n_eval", "n_classes"}`` with
    accuracies in [0, 1]; with ``outcomes_at`` (one of ``ks``), also the per-query outcomes at
    that k: ``(metrics, {"correct": bool, "predicted": class code})``, ``correct`` averaging to
    its ``top1``.
    """
    train_X, eval_X = check_features(train_X, "train_X"), check_features(eval_X, "eval_X")
    if train_X.shape[1] != eval_X.shape[1]:
        raise ProbeInputError(f"train_X has {train_X.shape[1]} features, eval_X has {eval_X.shape[1]}")
    if not ks or min(int(k) for k in ks) < 1:
        raise ProbeInputError(f"ks must be positive integers, got {ks!r}")
    train_lab, eval_lab, n_cls = _encode_labels(train_y, eval_y, n_classes)
    if len(train_lab) != train_X.shape[0] or len(eval_lab) != eval_X.shape[0]:
        raise ProbeInputError("train_y / eval_y must have one label per row of train_X / eval_X")
    n_train, ks = train_X.shape[0], sorted({int(k) for k in ks})
    if outcomes_at is not None and int(outcomes_at) not in ks:
        raise ProbeInputError(f"outcomes_at={outcomes_at} must be one of ks {ks}")
    from backbench.probe.stream import GroupRows, streamed_search

    streamed = isinstance(train_X, GroupRows)  # bigger than memory: one pass per query batch
    index = None if streamed else knn_index(train_X, device=device, search=search, batch_size=batch_size)
    hits = {k: np.zeros(2, dtype=np.int64) for k in ks}
    n_eval = eval_X.shape[0]
    correct, predicted = np.zeros(n_eval, dtype=bool), np.zeros(n_eval, dtype=np.int64)
    for rows, q in iter_normalized(eval_X, STREAM_QUERIES if streamed else batch_size):
        if streamed:
            sims, idx = streamed_search(train_X, q, min(ks[-1], n_train), device=device)
        else:
            sims, idx = index.search(q, min(ks[-1], n_train))
        w, lab = vote_weights(sims, temperature), train_lab[idx]
        for k in ks:
            kk = min(k, n_train)
            votes = class_votes(w[:, :kk], lab[:, :kk], n_cls)
            top1, top5 = _topk_rows(votes, eval_lab[rows])
            hits[k] += (int(top1.sum()), int(top5.sum()))
            if k == outcomes_at:
                correct[rows], predicted[rows] = top1, votes.argmax(axis=1)
    out: dict[str, Any] = {}
    for k in ks:
        out[f"top1@{k}"], out[f"top5@{k}"] = (float(h) / n_eval for h in hits[k])
    out.update(n_train=int(n_train), n_eval=int(n_eval), n_classes=n_cls)
    if outcomes_at is None:
        return out
    return out, {"correct": correct, "predicted": predicted}
