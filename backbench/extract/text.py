"""Text towers and their cached embeddings: class-name prompts (zero-shot) and captions (retrieval).

A backbone with a text tower (``open_clip:`` models, ``hf:`` CLIP and SigLIP) embeds texts with
its own tokenizer (:func:`load_text_tower`). Text embeddings are stored once per (backbone,
texts) in the cache, as a feature group of its own under ``_text/<backbone-slug>/<key>``: the
same arrays, row checksums and provenance as an image group (``features`` float32, ``labels``,
``ids``), outside the ``backbone/dataset/split`` tree that ``ls``, ``verify`` and the battle walk.
Its attributes name the texts' SHA-256 and the hash of the image tower loaded with this text
tower, so a group is reused only beside image features of the same weights, and is recomputed,
never misused, when the weights behind a name change. ``pack``, ``merge`` and ``export`` carry
these groups with the records that read them (:mod:`backbench.store.text_groups`).

Zero-shot prompts follow Radford et al. (2021) as CLIP_benchmark and open_clip run them: each
class name in every template, each prompt embedding L2-normalised, averaged over templates,
the mean L2-normalised again (:func:`class_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from backbench.errors import DataSourceError, NotApplicable, ProbeInputError, require
from backbench.store.cache import Cache, backbone_slug
from backbench.store.group import FeatureGroup
from backbench.store.text_groups import TEXT
# template sets open_clip ships (open_clip.zero_shot_metadata): CLIP's 80 ImageNet templates, and
# the 7 of them CLIP's notebook selected as an ensemble
TEMPLATE_SETS = {"openai": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}
DEFAULT_TEMPLATES = "openai"
TEXT_SOURCES = ("open_clip", "hf")
BATCH = 256  # texts per forward pass


@dataclass
class TextTower:
    """A loaded text tower: ``encode(texts) -> (n, d)`` embeddings (not normalised) and its
    provenance (``image_weights_sha256``, ``weights_sha256``, ``tokenizer``, ``weights_note``)."""

    backbone: str
    encode: Callable[[list[str]], Any]
    info: dict[str, Any]

    def embed(self, texts: Sequence[str], batch_size: int = BATCH) -> np.ndarray:
        """Float32 ``(len(texts), d)`` embeddings, in batches of ``batch_size`` texts."""
        parts = [np.asarray(self.encode(list(texts[i:i + batch_size])).float().cpu().numpy(), dtype=np.float32)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def check_text_source(backbone: str) -> None:
    """Refuse (:class:`NotApplicable`) a backbone whose source has no text towers, without loading it."""
    source = backbone.partition(":")[0].lower()
    if source not in TEXT_SOURCES:
        raise NotApplicable(f"{backbone} has no text tower: zero-shot and text retrieval need a vision-language "
                            f"backbone (open_clip:ARCH/TAG, or an hf: CLIP or SigLIP model)")


def load_text_tower(backbone: str, device: str = "cpu") -> TextTower:
    """The text tower of ``backbone`` (``open_clip:`` or an ``hf:`` CLIP/SigLIP name) on ``device``."""
    from backbench.extract.backbones import resolve

    check_text_source(backbone)
    spec, _ = resolve(backbone)
    if spec.source == "open_clip":
        from backbench.extract.backbones.open_clip import text_encoder
    else:
        from backbench.extract.backbones.hf import text_encoder
    encode, info = text_encoder(spec, device)
    return TextTower(backbone, encode, info)


# ------------------------------------------------------------------------------------ prompts
def default_templates(name: str = DEFAULT_TEMPLATES) -> list[str]:
    """A template set open_clip ships (:data:`TEMPLATE_SETS`) as strings with ``{c}``:
    ``openai`` (CLIP's 80 ImageNet templates, the default) or ``simple`` (7 of them)."""
    if name not in TEMPLATE_SETS:
        raise DataSourceError(f"templates {name!r}: use {' or '.join(TEMPLATE_SETS)}, or a list of templates")
    metadata = require("open_clip.zero_shot_metadata", "open_clip_torch", extra="clip")
    return [t("{c}") for t in getattr(metadata, TEMPLATE_SETS[name])]


def templates_of(value: str | Sequence[str] | None) -> list[str]:
    """A request's ``templates``: None (the default set), a set's name, or the templates themselves."""
    if value is None or isinstance(value, str):
        return default_templates(value or DEFAULT_TEMPLATES)
    return check_templates(value)


def read_templates(path: str | Path) -> list[str]:
    """A templates file: one template per line with ``{c}`` where the class name goes (blank
    lines and lines starting with ``#`` are skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataSourceError(f"cannot read templates file {str(path)!r} ({type(exc).__name__})") from None
    return check_templates([s.strip() for s in lines if s.strip() and not s.strip().startswith("#")], str(path))


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """Templates as a list, each holding ``{c}`` once at least; refused in one line otherwise."""
    out = [str(t) for t in templates]
    if not out:
        raise DataSourceError(f"{where}: no templates (one per line, with {{c}} where the class name goes)")
    bad = [t for t in out if "{c}" not in t]
    if bad:
        raise DataSourceError(f"{where}: template {bad[0]!r} has no {{c}} (where the class name goes), "
                              f"e.g. 'a photo of a {{c}}.'")
    return out


def prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class in every template, class-major: ``[t0(c0), t1(c0), ..., t0(c1), ...]``."""
    return [t.replace("{c}", str(c)) for c in classes for t in templates]


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes * n_templates, d)`` class-major prompt embeddings -> ``(n_classes, d)``:
    each normalised, averaged over a class's templates, the mean normalised (CLIP's recipe)."""
    E = np.asarray(prompt_embeddings, dtype=np.float64)
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    mean = E.reshape(n_classes, -1, E.shape[1]).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------- the cached group
def text_sha256(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def text_group_path(backbone: str, digest: str) -> str:
    return f"{TEXT}/{backbone_slug(backbone)}/{digest[:32]}"


@dataclass
class TextEmbeddings:
    """Cached text embeddings: ``X`` (n, d) float32, ``labels`` (class or image row per text),
    the group's attributes, and whether they were reused from the cache."""

    X: np.ndarray
    labels: np.ndarray
    attrs: dict[str, Any]
    reused: bool

    @property
    def key(self) -> str:
        return self.attrs["cache_key"]


def cached_text(cache: Cache, backbone: str, what: str, payload: dict[str, Any], image_weights: str,
                compute: Callable[[TextTower], tuple[np.ndarray, Sequence[int], Sequence[str]]],
                device: str = "cpu") -> TextEmbeddings:
    """The text embeddings of ``payload`` (what names the texts), read from the cache when a group
    of the same texts, beside image features of the same weights (``image_weights``), is there
    whole; else ``compute(tower) -> (embeddings, label per row, id per row)`` with the backbone's
    text tower (loaded only then, on ``device``), stored."""
    from backbench.store.lock import group_locked

    digest = text_sha256({"what": what, **payload})
    path = text_group_path(backbone, digest)
    found = _read(cache, path, digest, image_weights)
    if found is not None:
        return found
    tower = load_text_tower(backbone, device)
    if tower.info["image_weights_sha256"] != image_weights:
        raise ProbeInputError(f"the cached image features of {backbone} were extracted with other weights "
                              f"(sha256 {image_weights[:12]}) than its text tower loads now "
                              f"({tower.info['image_weights_sha256'][:12]}); extract them again with --overwrite")
    X, labels, ids = compute(tower)
    X = np.asarray(X, dtype=np.float32)
    cache.require_writable("store text embeddings")
    with group_locked(cache.path, path):
        found = _read(cache, path, digest, image_weights)  # another writer may have stored them meanwhile
        if found is not None:
            return found
        attrs = {"backbench_kind": "text", "backbone": backbone, "dataset": TEXT, "split": digest[:32],
                 "feature_kind": f"text:{what}", "weights_sha256": tower.info["weights_sha256"],
                 "image_weights_sha256": image_weights, "weights_note": tower.info.get("weights_note", ""),
                 "preprocess": {"tokenizer": tower.info["tokenizer"], "text": what},
                 "dataset_fingerprint": digest, "text_sha256": digest, "classes": [],
                 "dtype": "float32", **({"text": payload} if what == "prompts" else {})}
        group = FeatureGroup.create(cache.root, path, n=len(X), dim=int(X.shape[1]), dtype="float32", attrs=attrs)
        group.write_rows(0, X, np.asarray(labels, dtype=np.int64), [str(i) for i in ids])
        group.finalize()
    return TextEmbeddings(X, np.asarray(labels, dtype=np.int64), group.attrs, False)


def _read(cache: Cache, path: str, digest: str, image_weights: str) -> TextEmbeddings | None:
    """The stored group at ``path`` if it holds these texts for these weights, whole; else None."""
    from backbench.errors import CacheError

    try:
        node = cache.root[path]
    except KeyError:
        return None
    try:
        group = FeatureGroup(node).check()
        attrs = group.attrs
        if attrs.get("text_sha256") != digest or attrs.get("image_weights_sha256") != image_weights \
                or not group.is_complete:
            return None
        X, y = group.read_labeled(dtype=np.float32)
    except CacheError:  # torn or damaged: computed and written again
        return None
    return TextEmbeddings(X, y, attrs, True)
