"""kNN classification on frozen features: DINO's temperature-weighted vote.

Train features are L2-normalized and held in a faiss exact inner-product index
(``IndexFlatIP``), so inner product is cosine similarity. Queries are searched in chunks of
``batch_size`` rows, so memory never holds a queries x train matrix. Features may be any 2-D
array-like that slices by rows (numpy, zarr, h5py): only one chunk is converted to float32
at a time.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from backbench.errors import ProbeInputError, require

_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_GPU_RESOURCES: dict[int, Any] = {}  # faiss GPU resources must outlive their indexes


# --------------------------------------------------------------------------- faiss


def _openblas_coretype() -> str | None:
    """The OpenBLAS kernel family this CPU can run, or None to keep OpenBLAS's own choice.

    faiss-cpu wheels bundle an old OpenBLAS that does not recognise recent CPUs (AMD Zen 5
    among them) and falls back to SSE3 kernels, several times slower on every search.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return None
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def import_faiss() -> Any:
    """Import faiss lazily, pointing its bundled OpenBLAS at this CPU's vector kernels.

    Only acts when faiss is not imported yet and ``OPENBLAS_CORETYPE`` is unset (set it to
    override); the variable is removed again once OpenBLAS has read it at load time.
    """
    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        core = _openblas_coretype()
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
            try:
                return require("faiss", "faiss-cpu")
            finally:
                os.environ.pop("OPENBLAS_CORETYPE", None)
    return require("faiss", "faiss-cpu")


def to_device(index: Any, device: str = "cpu") -> Any:
    """Move a CPU faiss index to the GPU named by ``device`` ("cuda", "cuda:1") when faiss can."""
    if not str(device).startswith("cuda"):
        return index
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        warnings.warn(
            f"device={device!r} but this faiss has no GPU support; searching on CPU "
            "(for GPU search run `pip install faiss-gpu-cu12`)",
            stacklevel=3,
        )
        return index
    gpu = int(str(device).partition(":")[2] or 0)
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[gpu], gpu, index)


def flat_index(d: int, device: str = "cpu") -> Any:
    """An empty exact inner-product index of dimension ``d`` on ``device``."""
    return to_device(import_faiss().IndexFlatIP(int(d)), device)


# --------------------------------------------------------------------------- arrays


def check_features(X: Any, name: str = "X") -> Any:
    """``X`` as a 2-D row-sliceable array (numpy arrays, zarr and h5py arrays pass through)."""
    if not hasattr(X, "shape") or not hasattr(X, "__getitem__"):
        X = np.asarray(X)
    if len(X.shape) != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ProbeInputError(f"{name} must be a non-empty 2-D (samples, features) array, got shape {tuple(X.shape)}")
    return X


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float32, modified in place) scaled to unit norm; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, np.float32(1e-12))
    return x


def iter_normalized(X: Any, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, chunk)`` pairs: each chunk a fresh float32 C-contiguous L2-normalized copy."""
    if batch_size < 1:
        raise ProbeInputError(f"batch_size must be a positive integer, got {batch_size}")
    n = X.shape[0]
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        yield rows, l2_normalize(np.array(X[rows], dtype=np.float32, order="C", copy=True))


def add_normalized(index: Any, X: Any, batch_size: int) -> Any:
    """Add the L2-normalized rows of ``X`` to ``index``, one chunk at a time; return it."""
    for _, chunk in iter_normalized(X, batch_size):
        index.add(chunk)
    return index


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


def _topk_hits(votes: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """Counts of rows whose label ranks first / within the first five by votes.

    Ties rank the smaller class code first (as ``argmax`` does); a class with no vote at all
    never counts as a hit.
    """
    true = votes[np.arange(len(y)), y][:, None]
    ahead = (votes > true).sum(1) + ((votes == true) & (np.arange(votes.shape[1]) < y[:, None])).sum(1)
    voted = true[:, 0] > 0
    return int(((ahead == 0) & voted).sum()), int(((ahead < 5) & voted).sum())


# --------------------------------------------------------------------------- estimator


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on cosine similarity with DINO's weighted vote.

    ``weights="softmax"`` weighs each of the ``k`` neighbours by exp(sim / temperature)
    (DINO, DINOv2); ``weights="uniform"`` is a plain majority vote, as scikit-learn's
    ``KNeighborsClassifier`` does by default. Ties go to the first class in ``classes_``.
    """

    def __init__(
        self,
        k: int = 20,
        *,
        temperature: float = 0.07,
        weights: str = "softmax",
        device: str = "cpu",
        batch_size: int = 4096,
    ) -> None:
        self.k = k
        self.temperature = temperature
        self.weights = weights
        self.device = device
        self.batch_size = batch_size

    def fit(self, X: Any, y: Any) -> KNNClassifier:
        """Index the L2-normalized rows of ``X``; ``y`` holds their labels."""
        X = check_features(X)
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ProbeInputError(f"y must have one label per row of X ({X.shape[0]}), got shape {y.shape}")
        if int(self.k) < 1:
            raise ProbeInputError(f"k must be a positive integer, got {self.k}")
        self.classes_, self.train_labels_ = np.unique(y, return_inverse=True)
        self.index_ = flat_index(X.shape[1], self.device)
        add_normalized(self.index_, X, self.batch_size)
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
        if "index_" in state:  # faiss indexes are not picklable; store faiss's own bytes
            faiss = import_faiss()
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
) -> dict:
    """Top-1 and top-5 accuracy of DINO's weighted kNN vote for every k, from one search.

    Each eval chunk is searched once at max(ks); every k votes with the first k of those
    neighbours. k larger than the train set is clipped to it. Returns ``{"top1@{k}": acc,
    "top5@{k}": acc, ..., "n_train", "n_eval", "n_classes"}`` with accuracies in [0, 1].
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
    index = flat_index(train_X.shape[1], device)
    add_normalized(index, train_X, batch_size)
    hits = {k: np.zeros(2, dtype=np.int64) for k in ks}
    for rows, q in iter_normalized(eval_X, batch_size):
        sims, idx = index.search(q, min(ks[-1], n_train))
        w, lab = vote_weights(sims, temperature), train_lab[idx]
        for k in ks:
            kk = min(k, n_train)
            hits[k] += _topk_hits(class_votes(w[:, :kk], lab[:, :kk], n_cls), eval_lab[rows])
    n_eval = eval_X.shape[0]
    out: dict[str, Any] = {}
    for k in ks:
        out[f"top1@{k}"], out[f"top5@{k}"] = (float(h) / n_eval for h in hits[k])
    out.update(n_train=int(n_train), n_eval=int(n_eval), n_classes=n_cls)
    return out
