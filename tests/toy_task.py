"""A whole new task in one file: nearest class mean accuracy, registered with the task layer.

Nothing else is edited to add it: the CLI gets `backbench centroid`, a battle config may say
`[tasks.centroid]`, the Python API runs it with `backbench.run("centroid", ...)`, and the
leaderboard ranks its `top1`.
"""

from __future__ import annotations

import numpy as np

from backbench.probe.tasks import read_splits
from backbench.tasks import Param, Task, register
from backbench.tasks.base import NUMBER, logged


def centroid_top1(X: np.ndarray, y: np.ndarray, Xe: np.ndarray, ye: np.ndarray, shrink: float) -> float:
    """The pure function: classify each eval row by its nearest class mean (scaled by ``shrink``)."""
    classes = np.unique(y)
    means = np.stack([X[y == c].mean(0) for c in classes]) * shrink
    pred = classes[((Xe[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == ye).mean())


def _run(cache, request, options):
    tr, ev = read_splits(cache, request, options, ("train", "eval"))
    record = request.record({tr.name: tr.key, ev.name: ev.key}, splits={"train": tr.name, "eval": ev.name})
    shrink = float(request.params["shrink"])
    return [logged(cache, request, record, lambda: {"metrics": {"top1": centroid_top1(tr.X, tr.y, ev.X, ev.y, shrink)}},
                   options)]


CENTROID = register(Task("centroid", _run, {"shrink": Param(1.0, *NUMBER)}, metric="top1",
                         help="Nearest class mean accuracy on cached features."))
