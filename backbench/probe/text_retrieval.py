"""Image-text retrieval (Radford et al., 2021) on cached image embeddings and cached captions.

The protocol is CLIP_benchmark's (LAION-AI, ``clip_benchmark/metrics/zeroshot_retrieval.py``):
every image and caption of one captioned split (``captions:PATH.jsonl``, ``csv:PATH?caption=COL``)
is embedded and L2-normalised; scores are cosine similarities. Image->text recall@k: an image
query is correct when any of its captions is among the k best-scoring captions; text->image
recall@k: a caption query is correct when its image is among the k best images. Each is the
mean over queries. The leaderboard ranks ``mean_recall``, the mean of the six recalls at the
default ks 1, 5, 10 (the "RSUM" of the retrieval literature, divided by 6).

Per query, the rank of the first correct answer is kept as an outcome array (``i2t_rank`` per
image, ``t2i_rank`` per caption; 0 is the top), so any recall@k can be read again later. A tie
with a wrong answer counts in the query's favour (a rank counts strictly better answers).

Captions are read from the split's own source (recorded in its group, checked against the
group's fingerprint, which covers the captions) the first time, then embedded with the
backbone's text tower and cached like prompts (:func:`backbench.extract.text.cached_text`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backbench.errors import NotApplicable, ProbeInputError
from backbench.probe import resample
from backbench.probe.zeroshot import logs_not_applicable
from backbench.store.cache import Cache
from backbench.tasks.base import INTS, Param, Record, RunOptions, Task, TaskRequest, logged, register

BLOCK = 1024  # query rows scored at once


def _normalised(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ProbeInputError(f"{int((norms == 0).sum())} embedding(s) are all zeros; re-extract them")
    return X / norms


def retrieval_ranks(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``i2t_rank`` per image, ``t2i_rank`` per caption): how many answers score strictly higher
    than the best correct one. ``text_image[j]``: the image row of caption ``j``."""
    I, T = _normalised(images), _normalised(texts)
    owner = np.asarray(text_image, dtype=np.int64)
    if len(owner) != len(T) or (len(owner) and (owner.min() < 0 or owner.max() >= len(I))):
        raise ProbeInputError(f"{len(T)} captions need one image row each in 0..{len(I) - 1}")
    t2i = np.empty(len(T), dtype=np.int64)
    for a in range(0, len(T), BLOCK):
        s = T[a:a + BLOCK] @ I.T  # (texts, images)
        true = s[np.arange(len(s)), owner[a:a + BLOCK]]
        t2i[a:a + BLOCK] = (s > true[:, None]).sum(axis=1)
    i2t = np.empty(len(I), dtype=np.int64)
    for a in range(0, len(I), BLOCK):
        s = I[a:a + BLOCK] @ T.T  # (images, texts)
        mine = owner[None, :] == np.arange(a, a + len(s))[:, None]
        if not mine.any(axis=1).all():
            raise ProbeInputError("every image needs one caption at least")
        best = np.where(mine, s, -np.inf).max(axis=1)
        i2t[a:a + BLOCK] = (s > best[:, None]).sum(axis=1)
    return i2t, t2i


def text_retrieval_metrics(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray,
                           ks: Sequence[int] = (1, 5, 10)) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics, outcomes): ``image_to_text_R@k`` and ``text_to_image_R@k`` for each k,
    ``mean_recall`` (their mean), ``n_images``, ``n_texts``; the ranks as outcome arrays."""
    i2t, t2i = retrieval_ranks(images, texts, text_image)
    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((i2t < k).mean())
        metrics[f"text_to_image_R@{k}"] = float((t2i < k).mean())
    metrics["mean_recall"] = float(np.mean([v for v in metrics.values()]))
    metrics.update(n_images=int(len(i2t)), n_texts=int(len(t2i)))
    return metrics, {"i2t_rank": resample.compact(i2t), "t2i_rank": resample.compact(t2i)}


def is_captioned(spec: str) -> bool:
    """Whether a group's source has captions: a captions file, a CSV with caption columns, or the
    built-in ``shapes`` (each image described by :func:`~backbench.extract.datasets.shapes.shapes_caption`)."""
    return spec.startswith(("captions:", "shapes:")) or (spec.startswith("csv:") and "?caption=" in spec)


def _captions(group, ids: list[str]) -> tuple[list[str], np.ndarray]:
    """The captions of the images ``ids`` (rows of ``group``) from the group's own source, checked
    to be the source it was extracted from: (captions flat, image row of each)."""
    from backbench.errors import DataSourceError
    from backbench.extract.datasets import limit_source, open_source

    attrs = group.attrs
    try:
        source = limit_source(open_source(attrs["source"], attrs["split"]), int(attrs["n"]))
    except DataSourceError as exc:
        raise ProbeInputError(f"the captions of {group.path} are read once from its source, which cannot be "
                              f"opened now: {exc}") from None
    if source.fingerprint() != attrs.get("dataset_fingerprint"):
        raise ProbeInputError(f"{attrs['source']} has changed since {group.path} was extracted from it (its "
                              f"images or captions); extract it again with --overwrite")
    by_id = dict(zip(source.ids, source.captions))
    texts, owner = [], []
    for row, i in enumerate(ids):
        texts += by_id[i]
        owner += [row] * len(by_id[i])
    return texts, np.asarray(owner, dtype=np.int64)


def _text_retrieval(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """Image->text and text->image recall@k of the eval split's images and captions."""
    from backbench.extract.text import cached_text, check_text_source, text_sha256
    from backbench.probe.data import load_split

    check_text_source(request.backbone)
    if not request.features.pooled:
        raise NotApplicable(f"text retrieval reads the image embedding (the pooled features), not "
                            f"{request.features.spec!r}")
    split = request.splits["eval"]
    group = cache.group(request.backbone, request.dataset, split)
    if not is_captioned(str(group.attrs.get("source", ""))):
        raise NotApplicable(f"{request.dataset}/{split} has no captions (its source is {group.attrs.get('source')}); "
                            f"text retrieval needs captions:PATH.jsonl or csv:PATH?caption=COL")
    ev = load_split(cache, request.backbone, request.dataset, split, complete_only=options.complete_only,
                    memory_limit=1 << 62)
    labels = ev.group.labels(complete_only=options.complete_only)
    ids = [str(v) for v, y in zip(ev.group.ids(complete_only=options.complete_only), labels) if y >= 0]

    def embed(tower):
        texts, owner = _captions(ev.group, ids)
        return tower.embed(texts), owner, texts

    payload = {"dataset_fingerprint": ev.group.attrs["dataset_fingerprint"], "rows": text_sha256({"ids": ids})}
    text = cached_text(cache, request.backbone, "captions", payload, ev.group.attrs["weights_sha256"], embed,
                       options.device)
    ks = sorted({int(k) for k in request.params["ks"]})
    record = request.record({ev.name: ev.key, "text": text.key}, params={"ks": ks})

    def compute() -> Record:
        metrics, outcomes = text_retrieval_metrics(ev.X, text.X, text.labels, ks)
        return {"metrics": metrics, "text_group": text.attrs.get("split"), "outcomes": outcomes}

    return [logged(cache, request, record, compute, options)]


TEXT_RETRIEVAL = register(Task(
    "text-retrieval", logs_not_applicable(_text_retrieval), {"ks": Param([1, 5, 10], *INTS)}, roles=("eval",), metric="mean_recall",
    cli="retrieve", resample=resample.text_retrieval,
    help="Image-text retrieval with the backbone's text tower on a captioned split: image->text and "
         "text->image recall@k (CLIP_benchmark's)."))
