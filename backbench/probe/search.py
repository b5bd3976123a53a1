"""Exact nearest-neighbour search on L2-normalized features: faiss, and a faster CPU path.

``Int8FlatIndex`` (``search="fast"``, the CPU default): an int8 matrix product picks
candidates, exact float32 dot products rank them, and a query whose result the int8 rounding
could have changed is searched again exactly. ``search="exact"`` (and GPUs) use faiss's
``IndexFlatIP``. Also the faiss import and device helpers every search in backbench uses.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from backbench.errors import ProbeInputError, require
from backbench.probe.blocks import iter_blocks, l2_normalize

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
    """``X`` as a 2-D row-sliceable array (numpy arrays, zarr and h5py arrays pass through).

    Sparse and complex inputs are refused in scikit-learn's words, as ``check_array`` would.
    """
    if type(X).__module__.startswith("scipy.sparse"):
        raise ProbeInputError(f"{name} is a sparse matrix: sparse input is not supported; pass {name}.toarray()")
    if not hasattr(X, "shape") or not hasattr(X, "__getitem__"):
        X = np.asarray(X)
    if getattr(getattr(X, "dtype", None), "kind", None) == "c":
        raise ProbeInputError(f"{name} must be real numbers, got dtype {X.dtype}: Complex data not supported")
    shape = tuple(X.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        none = f" (0 feature(s) (shape={shape}) while a minimum of 1 is required)" if shape[1:] == (0,) else ""
        raise ProbeInputError(f"{name} must be a non-empty 2-D (samples, features) array, got shape {shape}{none}")
    return X


def iter_normalized(X: Any, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, chunk)`` pairs: each chunk a fresh float32 C-contiguous L2-normalized copy."""
    for start, chunk in iter_blocks(X, batch_size, dtype=np.float32, normalize=True):
        yield slice(start, start + len(chunk)), chunk


def add_normalized(index: Any, X: Any, batch_size: int) -> Any:
    """Add the L2-normalized rows of ``X`` to ``index``, one chunk at a time; return it."""
    for _, chunk in iter_normalized(X, batch_size):
        index.add(chunk)
    return index


# --------------------------------------------------------------------------- two-stage search

SEARCHES = ("auto", "fast", "exact")
_SCORE_BLOCK = 1 << 26  # int32 scores held at once by the int8 pass (256 MiB)
_GROUP = 32  # columns per group in the candidate selection (see Int8FlatIndex._candidates)
_Z = 8.0  # a result stands only if it clears the candidate boundary by this many error sigmas


def normalized_rows(X: Any, batch_size: int) -> np.ndarray:
    """All rows of ``X`` L2-normalized into one new float32 array, converted chunk by chunk."""
    out = np.empty(X.shape, dtype=np.float32)
    for start, block in iter_blocks(X, batch_size):
        part = out[start:start + len(block)]
        part[:] = block
        l2_normalize(part)
    return out


class Int8FlatIndex:
    """Exact inner-product top-k over unit rows ``xb``, sped up by an int8 first pass.

    Queries are scored against int8 codes of the rows (``torch._int_mm``: VNNI on x86, about
    2.5x a float32 GEMM); the best ``max(2k, k + 32)`` are re-ranked by exact float32 dot
    products. Codes hold one scale per feature (127 / its largest magnitude), folded into the
    query, so int32 scores rank rows directly. A query whose k-th exact similarity does not
    clear every non-candidate's best possible similarity (the boundary score plus ``_Z``
    standard deviations of its rounding error) is searched again exactly (``faiss.knn``), so
    the neighbours are the exact ones unless rounding errors conspire far beyond chance.
    Searches like a faiss index: ``search(q, k) -> (sims, ids)``, rows of ``q`` unit-norm.
    """

    def __init__(self, xb: np.ndarray) -> None:
        self.xb = np.ascontiguousarray(xb, dtype=np.float32)
        self._encode()

    @property
    def ntotal(self) -> int:
        return len(self.xb)

    def _encode(self, rows: int = 512) -> None:
        import torch

        self.n_queries = self.n_redone = 0  # queries searched, and those searched again exactly
        self._local = threading.local()  # holds the score buffer, up to _SCORE_BLOCK int32
        xb = self.xb
        amax = np.zeros(xb.shape[1], dtype=np.float32)
        for start in range(0, len(xb), rows):  # blocks that stay in cache
            np.maximum(amax, np.abs(xb[start:start + rows]).max(axis=0), out=amax)
        self.step = np.where(amax > 0, amax / 127, 1).astype(np.float32)  # value of one code unit
        n_pad = -(-len(xb) // _GROUP) * _GROUP  # zero rows up to whole groups of columns
        codes, norm2, inv = np.zeros((n_pad, xb.shape[1]), dtype=np.int8), 0.0, 1 / self.step
        for start in range(0, len(xb), rows):
            block = np.multiply(xb[start:start + rows], inv)
            np.clip(np.rint(block, out=block), -127, 127, out=block)
            codes[start:start + len(block)] = block
            norm2 = max(norm2, float(np.einsum("ij,ij->i", block, block).max()))
        self.codes, self.code_norm2 = torch.from_numpy(codes), norm2  # largest squared code norm

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, n_cand = np.ascontiguousarray(q, dtype=np.float32), min(self.ntotal, max(2 * k, k + 32))
        if n_cand >= self.ntotal or len(q) == 0:
            return self._exact(q, k)
        n_blocks = -(-len(q) * self.ntotal // _SCORE_BLOCK)  # equal blocks of at most _SCORE_BLOCK scores
        step = -(-len(q) // n_blocks)
        parts = [self._search_block(q[s:s + step], k, n_cand) for s in range(0, len(q), step)]
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        return faiss.knn(q, self.xb, k, metric=faiss.METRIC_INNER_PRODUCT)

    def _search_block(self, q: np.ndarray, k: int, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        qs = q * self.step  # query in code units of the rows
        amax = np.abs(qs).max(axis=1)
        t = np.where(amax > 0, 127 / np.maximum(amax, np.float32(1e-30)), 1).astype(np.float32)
        q8 = np.rint(qs * t[:, None]).astype(np.int8)
        scores = torch._int_mm(torch.from_numpy(q8), self.codes.T, out=self._scores(len(q)))
        scores[:, self.ntotal:] = torch.iinfo(torch.int32).min  # the padding rows
        top, cand = self._candidates(scores, n_cand)
        sims, ids = self._rerank(q, cand.numpy(), k)
        # a non-candidate scored at most the boundary; its exact similarity exceeds that by the
        # rounding error: sum_j q_j step_j e_j (rows) + sum_j eta_j code_j (query), |e|, |eta t| <= 1/2
        sigma = np.sqrt((np.square(qs).sum(axis=1) + self.code_norm2 / np.square(t)) / 12)
        boundary = top.min(dim=1).values.numpy() / t
        redo = np.flatnonzero(sims[:, -1] <= boundary + _Z * sigma)
        self.n_queries, self.n_redone = self.n_queries + len(q), self.n_redone + len(redo)
        if len(redo):
            sims[redo], ids[redo] = self._exact(q[redo], k)
        return sims, ids

    def _scores(self, rows: int) -> Any:
        """An int32 (rows, padded ntotal) buffer kept per thread: fresh pages for each block of
        scores would cost a third as much as the product itself."""
        import torch

        buf = getattr(self._local, "scores", None)
        if buf is None or buf.shape[0] < rows:
            buf = self._local.scores = torch.empty((rows, len(self.codes)), dtype=torch.int32)
        return buf[:rows]

    @staticmethod
    def _candidates(scores: Any, n_cand: int) -> tuple[Any, Any]:
        """Values and columns of the ``n_cand`` largest scores of each row, unordered.

        The ``n_cand`` groups of ``_GROUP`` columns with the largest maxima hold them, so the
        top-k of all columns narrows to a top-k of group maxima and one of those groups' columns,
        a third less work than one ``topk`` over all columns.
        """
        import torch

        m, n = scores.shape
        if n < 4 * _GROUP * n_cand:
            return torch.topk(scores, n_cand, dim=1, sorted=False)
        groups = torch.topk(scores.view(m, -1, _GROUP).amax(dim=2), n_cand, dim=1, sorted=False).indices
        cols = (groups[:, :, None] * _GROUP + torch.arange(_GROUP)).reshape(m, -1)
        top, j = torch.topk(torch.gather(scores, 1, cols), n_cand, dim=1, sorted=False)
        return top, torch.gather(cols, 1, j)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each row's candidates by exact similarity; ties to the lower id."""
        faiss, cand = import_faiss(), np.sort(cand, axis=1)
        sims = np.empty(cand.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(sims), faiss.swig_ptr(q), faiss.swig_ptr(self.xb),
                                         faiss.swig_ptr(cand), q.shape[1], len(q), cand.shape[1])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, axis=1), np.take_along_axis(cand, order, axis=1)

    def __getstate__(self) -> dict:
        return {"xb": self.xb}  # the codes are rebuilt on load

    def __setstate__(self, state: dict) -> None:
        self.xb = state["xb"]
        self._encode()


def knn_index(X: Any, *, device: str = "cpu", search: str = "auto", batch_size: int = 4096) -> Any:
    """An exact top-k index over the L2-normalized rows of ``X``, searched like a faiss index.

    ``search="fast"`` (what ``"auto"`` picks on CPU) builds an ``Int8FlatIndex``;
    ``"exact"`` (what it picks for a ``cuda`` device) faiss's ``IndexFlatIP`` on ``device``.
    """
    if search not in SEARCHES:
        raise ProbeInputError(f"search must be one of {', '.join(map(repr, SEARCHES))}, got {search!r}")
    gpu = str(device).startswith("cuda")
    if search == "auto":
        search = "exact" if gpu else "fast"
    if search == "exact":
        return add_normalized(flat_index(X.shape[1], device), X, batch_size)
    if gpu:
        raise ProbeInputError(f"search='fast' runs on CPU only; use search='exact' with device={device!r}")
    return Int8FlatIndex(normalized_rows(X, batch_size))
