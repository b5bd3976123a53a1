"""The ``open_clip:`` source: the image tower of an open_clip model, ``ARCH/TAG`` or ``ARCH@random``.

open_clip is imported when an ``open_clip:`` name is listed, checked or loaded.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from backbench.errors import WeightsError, require
from backbench.extract.backbones.hub import fetching
from backbench.extract.backbones.registry import RANDOM, Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import seeded, state_dict_sha256
from backbench.extract.preprocess import Preprocess


@lru_cache(maxsize=1)
def _ids() -> list[str]:
    open_clip = require("open_clip", extra="clip")

    return sorted(open_clip.list_models()) + [f"{a}/{t}" for a, t in open_clip.list_pretrained()]


def _valid(ident: str) -> bool:
    open_clip = require("open_clip", extra="clip")

    arch, _, tag = ident.partition("/")
    if arch not in open_clip.list_models():
        return False
    return not tag or (arch, tag) in set(open_clip.list_pretrained())


def _forward(model: Any, x: Any) -> tuple[Any, Any]:
    return model(x), None


def _preprocess(visual: Any) -> Preprocess:
    """The image tower's own preprocessing config, else OpenAI's statistics at its image size."""
    open_clip = require("open_clip", extra="clip")

    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", visual.image_size)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(
        input_size=(3, int(h), int(w)),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )


def _create(spec: BackboneSpec) -> tuple[Any, str]:
    """The whole open_clip model a name builds (both towers) and its weights note."""
    open_clip = require("open_clip", extra="clip")

    arch, _, tag = spec.id.partition("/")
    if spec.weights not in (None, RANDOM) or (spec.weights is None and not tag):
        raise WeightsError(
            f"open_clip backbones are open_clip:ARCH/TAG (pretrained) or open_clip:ARCH@random; "
            f"got open_clip:{spec.id}{'@' + spec.weights if spec.weights else ''}"
        )
    if spec.weights == RANDOM:
        seeded()
        return open_clip.create_model(arch, pretrained=None), "random init (torch seed 0)"
    with fetching(f"open_clip weights {arch}/{tag}", f"open_clip:{arch}@random"):
        model = open_clip.create_model(arch, pretrained=tag)
    return model, f"open_clip pretrained tag {tag}"


@register_source("open_clip", list_ids=lambda: _ids(), validate=_valid)
def load_open_clip(spec: BackboneSpec) -> Backbone:
    """``open_clip:ARCH/TAG`` (pretrained) or ``open_clip:ARCH@random``."""
    model, note = _create(spec)
    return Backbone(spec, model.visual, _preprocess(model.visual), _forward, False, note)


def text_encoder(spec: BackboneSpec, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The text tower of ``open_clip:ARCH/TAG`` or ``open_clip:ARCH@random`` with open_clip's own
    tokenizer, on ``device``: ``(encode(texts) -> (n, d) tensor, info)``. The model is built exactly as
    :func:`load_open_clip` builds it, so ``info["image_weights_sha256"]`` is the weights hash
    the image groups of this name record."""
    import torch

    open_clip = require("open_clip", extra="clip")

    model, note = _create(spec)
    model.eval().requires_grad_(False)
    arch = spec.id.partition("/")[0]
    tokenizer = open_clip.get_tokenizer(arch)

    info = {"image_weights_sha256": state_dict_sha256(model.visual.state_dict()),
            "weights_sha256": state_dict_sha256(model.state_dict()),
            "tokenizer": f"open_clip.get_tokenizer({arch!r}): {type(tokenizer).__name__}", "weights_note": note}
    model.to(device)

    def encode(texts: list[str]) -> Any:
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts).to(device))

    return encode, info
