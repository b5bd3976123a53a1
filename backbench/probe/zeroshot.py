"""Zero-shot classification (Radford et al., 2021) on cached image embeddings.

The protocol, as CLIP_benchmark (LAION-AI) and open_clip run it: the class names of the eval
split, each in every template (CLIP's 80 ImageNet templates by default, as open_clip ships them), go through the
backbone's own tokenizer and text tower; the prompt embeddings are L2-normalised, averaged per
class and normalised again (:func:`backbench.extract.text.class_embeddings`, cached once per
backbone, class names and templates). An image's logits are its normalised embedding dotted with
each class embedding (CLIP's logit scale changes no ranking, so it is left out). Metrics are
CLIP_benchmark's: top-1, top-5 (k at most the number of classes) and the mean per-class recall
(scikit-learn's ``balanced_accuracy_score``); per-image ``correct`` and ``predicted`` are kept
as outcome arrays of the record. The prompts use the split's class names as stored, or
``classnames`` in their place (readable names for folders named by ids, e.g. ImageNet's wnids).

The image embedding is the cached ``pooled`` feature: for ``open_clip:`` backbones it is
``encode_image`` (the image tower's output after its projection), for ``hf:`` CLIP
``get_image_features`` (after ``visual_projection``), for SigLIP the pooled head output, which
is what those models' zero-shot uses. Backbones without a text tower are not applicable
(:class:`~backbench.errors.NotApplicable`: "n/a" in a battle, never a failure). Images are scored
in blocks of rows; above the memory limit the eval split is read from the cache as it goes
(:func:`zeroshot_ranking`), with the same result.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from backbench.errors import NotApplicable, ProbeInputError
from backbench.probe import resample as _resample
from backbench.store.cache import Cache
from backbench.tasks.base import Param, Record, RunOptions, Task, TaskRequest, is_text, list_of, logged, register

TOPK = (1, 5)
BLOCK_ROWS = 4096  # images scored at once: memory flat in the split's size, streamed or not


def zeroshot_logits(image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
    """``(n_images, n_classes)`` cosine similarities: normalised images @ class embeddings.T."""
    X = np.asarray(image_embeddings, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ProbeInputError(f"{int((norms == 0).sum())} image embedding(s) are all zeros; re-extract them")
    return (X / norms) @ np.asarray(class_embeddings, dtype=np.float64).T


def zeroshot_ranking(image_embeddings: Any, class_embeddings: np.ndarray, k: int,
                     block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """``(n_images, min(k, n_classes))``: each image's best classes, best first (ties in class
    order, as a stable argsort of :func:`zeroshot_logits`), scored ``block_rows`` images at a
    time; a lazy :class:`~backbench.probe.stream.GroupRows` is read from the cache as it goes."""
    from backbench.probe.blocks import iter_blocks

    C = np.asarray(class_embeddings)
    out = np.empty((int(image_embeddings.shape[0]), min(int(k), C.shape[0])), dtype=np.int64)
    for start, block in iter_blocks(image_embeddings, block_rows):
        order = np.argsort(-zeroshot_logits(block, C), axis=1, kind="stable")
        out[start:start + len(order)] = order[:, :out.shape[1]]
    return out


def zeroshot_metrics(logits: np.ndarray, y: np.ndarray, ks: Sequence[int] = TOPK) -> tuple[dict[str, Any],
                                                                                            dict[str, np.ndarray]]:
    """(metrics, outcomes): top-k accuracy for each k (``top{k}``, k clipped to the classes),
    ``mean_per_class_recall`` over the classes present in ``y``, ``n``; per-image outcomes
    ``correct`` (top-1) and ``predicted``."""
    logits = np.asarray(logits)
    return ranked_metrics(np.argsort(-logits, axis=1, kind="stable"), y, logits.shape[1], ks)


def ranked_metrics(order: np.ndarray, y: np.ndarray, n_classes: int, ks: Sequence[int] = TOPK) -> tuple[
        dict[str, Any], dict[str, np.ndarray]]:
    """:func:`zeroshot_metrics` from each image's best classes (``order``: at least the
    ``min(max(ks), n_classes)`` best, best first)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    y = np.asarray(y, dtype=np.int64)
    predicted = order[:, 0].astype(np.int64)
    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"top{k}"] = float((order[:, :min(int(k), n_classes)] == y[:, None]).any(axis=1).mean())
    with warnings.catch_warnings():  # predictions of classes absent from y are expected, not news
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        metrics["mean_per_class_recall"] = float(balanced_accuracy_score(y, predicted))
    metrics["n"] = int(len(y))
    return metrics, {"correct": predicted == y, "predicted": _resample.compact(predicted)}


def logs_not_applicable(run: Callable[..., list[tuple[Record, bool]]]) -> Callable[..., list[tuple[Record, bool]]]:
    """``run`` that, when its task does not apply (:class:`NotApplicable`), also logs a record
    saying why (no metrics; the leaderboard shows the cell as n/a), then raises as before."""
    def wrapped(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
        try:
            return run(cache, request, options)
        except NotApplicable as exc:
            reason = str(exc)
            if not cache.read_only:
                from backbench.store.results import ResultsLog

                ResultsLog(cache).run(request.record({}), lambda: {"metrics": {}, "not_applicable": reason},
                                      force=options.force)
            raise

    return wrapped


def _classes(cache: Cache, request: TaskRequest, options: RunOptions):
    """The eval split (the image embeddings) of a zero-shot request, checked to be readable."""
    from backbench.probe.data import load_split
    from backbench.probe.stream import resolve_memory_limit

    if not request.features.pooled:
        raise NotApplicable(f"zero-shot reads the image embedding (the pooled features), not "
                            f"{request.features.spec!r}")
    ev = load_split(cache, request.backbone, request.dataset, request.splits["eval"],
                    complete_only=options.complete_only, memory_limit=resolve_memory_limit(options.memory_limit))
    if ev.group.attrs.get("multilabel"):
        raise ProbeInputError(f"{ev.label} is multi-label; zero-shot classification needs one label per image")
    return ev


def _zeroshot(cache: Cache, request: TaskRequest, options: RunOptions) -> list[tuple[Record, bool]]:
    """Zero-shot top-1/top-5/mean per-class recall of the eval split against class-name prompts."""
    from backbench.extract.text import (DEFAULT_TEMPLATES, cached_text, check_text_source, class_embeddings,
                                        prompts, templates_of)

    check_text_source(request.backbone)
    ev = _classes(cache, request, options)
    given = request.params.get("templates") or DEFAULT_TEMPLATES
    templates = templates_of(given)
    classes = [str(c) for c in ev.classes]
    names = request.params.get("classnames")
    if names and len(names) != len(classes):
        raise ProbeInputError(f"{ev.label} has {len(classes)} classes but {len(names)} class names were given; "
                              f"give one name per class, in the order of its classes ({_first(classes)})")
    classes = [str(c) for c in names] if names else classes

    def embed(tower):
        return class_embeddings(tower.embed(prompts(classes, templates)), len(classes)), range(len(classes)), classes

    text = cached_text(cache, request.backbone, "prompts", {"classes": classes, "templates": templates},
                       ev.group.attrs["weights_sha256"], embed, options.device)
    if text.X.shape[1] != ev.X.shape[1]:
        raise ProbeInputError(f"{ev.label}: image embeddings have {ev.X.shape[1]} features but the text tower "
                              f"gives {text.X.shape[1]}; the cached features are not this CLIP's embedding")
    params = {"templates": given if isinstance(given, str) else list(given), "n_templates": len(templates),
              **({"classnames": classes} if names else {})}
    record = request.record({ev.name: ev.key, "text": text.key}, params=params)

    def compute() -> Record:
        order = zeroshot_ranking(ev.X, text.X, max(TOPK))  # streamed when ev.X is read from the cache
        metrics, outcomes = ranked_metrics(order, ev.y, len(classes))
        return {"metrics": {**metrics, "classes": classes}, "text_group": text.attrs.get("split"),
                "outcomes": outcomes}

    return [logged(cache, request, record, compute, options)]


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _is_templates(value: Any) -> bool:
    from backbench.extract.text import TEMPLATE_SETS

    return value in TEMPLATE_SETS if isinstance(value, str) else list_of(is_text)(value)


ZEROSHOT = register(Task(
    "zeroshot", logs_not_applicable(_zeroshot),
    {"templates": Param(None, _is_templates, 'openai (CLIP\'s 80 ImageNet templates), simple (7 of them) or a '
                                             'non-empty list of templates with {c}, e.g. ["a photo of a {c}."]',
                        lambda v: v if isinstance(v, str) else list(v)),
     "classnames": Param(None, list_of(is_text), 'a list of readable class names, one per class of the eval split '
                                                 'in its order, e.g. ["tench", "goldfish"]', list)},
    roles=("eval",), metric="top1", cli="zeroshot", resample=_resample.classification,
    help="Zero-shot classification with the backbone's text tower (CLIP's prompts): top-1, top-5, "
         "mean per-class recall."))
