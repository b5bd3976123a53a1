"""The ``torchvision:`` source: torchvision's image classifiers, with ``@TAG`` weights (from the
torch hub cache, or downloaded), ``@random`` or ``@PATH``.

Features are the input of the last classifier layer (see
:class:`~backbench.extract.backbones.towers.ClassifierTower`). torchvision is imported when a
``torchvision:`` name is listed, checked or loaded.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones.hub import answers, fetching
from backbench.extract.backbones.registry import LOCAL, Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import IMAGENET_MEAN, IMAGENET_STD, crop_pct
from backbench.extract.backbones.weights import apply_state_dict, read_state_dict, seeded
from backbench.extract.preprocess import Preprocess

_AUX = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


@lru_cache(maxsize=1)
def _ids() -> list[str]:
    """torchvision's image classifiers: the models that are backbones (not detection, video...)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


@lru_cache(maxsize=1)
def _all() -> frozenset[str]:
    import torchvision.models as tvm

    return frozenset(tvm.list_models())


def _tags(ident: str) -> list[str]:
    import torchvision.models as tvm

    if ident not in _all():
        return []
    return list(tvm.get_model_weights(ident).__members__)


def _hub_dir() -> Path:
    """``torch.hub.get_dir()``, without importing torch when it is not imported yet."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def _on_machine() -> list[tuple[str, str]]:
    """Classifiers whose weights files are already in the torch hub cache (torch and
    torchvision are imported only when that folder holds files)."""
    folder = _hub_dir() / "checkpoints"
    have = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if not have:
        return []
    import torchvision.models as tvm

    out = []
    for ident in _ids():
        enum = tvm.get_model_weights(ident)
        default = enum.DEFAULT
        for tag, weights in enum.__members__.items():
            if tag == "DEFAULT" or weights.url.rsplit("/", 1)[-1] not in have:
                continue
            name = f"torchvision:{ident}" if weights is default else f"torchvision:{ident}@{tag}"
            out.append((name, f"torch hub cache ({weights})"))
    return out


def _reachable(weights: Any, what: str, instead: str) -> None:
    """Refuse at once (no "Downloading:" line, no wait) when the weights file is not in the torch
    hub cache and its server does not answer one quick request."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = weights.url.rsplit("/", 1)[-1]
    if not (folder / name).is_file() and not answers(weights.url):
        host = weights.url.split("/")[2]
        raise WeightsError(f"cannot get {what} ({host} did not answer and {name} is not in {folder}); "
                           f"offline? use {instead}")


def _head(model: Any) -> str:
    """The qualified name of the classifier: the last ``nn.Linear`` (else the last ``nn.Conv2d``,
    as in SqueezeNet, whose classifier is a 1x1 convolution)."""
    import torch.nn as nn

    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, mod in model.named_modules() if isinstance(mod, kind) and name]
        if names:
            return names[-1]
    raise BackboneNotFound(f"{type(model).__name__} has no nn.Linear or nn.Conv2d classifier to take features from")


def _forward(model: Any, x: Any) -> tuple[Any, Any]:
    return model(x)  # a ClassifierTower: (features, logits or None)


def _preprocess(weights: Any) -> Preprocess:
    """From the weights' transforms preset (crop, resize, interpolation, mean, std); building
    the preset downloads nothing. ImageNet 224/256 bilinear if it cannot be had."""
    try:
        t = weights.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    except Exception:
        crop, resize, interp, mean, std = 224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD
    return Preprocess(input_size=(3, crop, crop), mean=mean, std=std, interpolation=interp,
                      crop_pct=crop_pct(crop, resize))


def _pretrained(spec: BackboneSpec, weights: Any) -> tuple[Any, bool, str]:
    """The classifier with torchvision's own weights ``weights``, from the hub cache or downloaded."""
    import torchvision.models as tvm

    what = f"torchvision weights {weights}"
    instead = f"torchvision:{spec.id}@random, torchvision:{spec.id}@PATH, or a name from `backbench models`"
    _reachable(weights, what, instead)
    with fetching(what, instead, hub=False):
        model = tvm.get_model(spec.id, weights=weights)
    return model, True, f"torchvision weights {weights}"


def _offline(spec: BackboneSpec) -> tuple[Any, bool, str]:
    """A random-init classifier, then the ``@PATH`` state dict loaded into it if named (a
    fine-tuned head gets an architecture with as many classes)."""
    import torchvision.models as tvm

    path = spec.weights_path
    sd = read_state_dict(path) if path is not None else {}
    kw = {}
    if spec.id in _AUX:  # GoogLeNet, Inception v3: auxiliary heads only when the file has them;
        kw = {"init_weights": True, "aux_logits": any(k.startswith(_AUX[spec.id]) for k in sd)}
        if path is not None:  # and the input transform torchvision's own weights for them expect
            kw["transform_input"] = True
    seeded()
    model = tvm.get_model(spec.id, weights=None, **kw)
    if path is None:
        return model, False, "random init (torch seed 0)"
    head_w = sd.get(_head(model) + ".weight")
    if head_w is not None and head_w.shape[0] != model.get_submodule(_head(model)).weight.shape[0]:
        seeded()  # a fine-tuned head: build the architecture with that many classes
        model = tvm.get_model(spec.id, weights=None, num_classes=int(head_w.shape[0]), **kw)
    head = _head(model)
    has_logits, how = apply_state_dict(model, sd, {k for k in model.state_dict() if k.startswith(head + ".")})
    return model, has_logits, f"{path}: {how}"


@register_source("torchvision", list_ids=lambda: _ids(), validate=lambda ident: ident in _all(),
                 on_machine=_on_machine, weight_tags=_tags,
                 catalog_note="download from download.pytorch.org; or @random / @PATH / @TAG (e.g. @IMAGENET1K_V2)")
def load_torchvision(spec: BackboneSpec) -> Backbone:
    """``torchvision:NAME`` (default weights), ``@TAG``, ``@random`` or ``@PATH``."""
    import torchvision.models as tvm

    from backbench.extract.backbones.towers import ClassifierTower

    if spec.id not in _ids():
        raise BackboneNotFound(
            f"torchvision:{spec.id} is not an image classifier (detection, segmentation, video, optical-flow and "
            f"quantized models are not backbones); see `backbench models --source torchvision`"
        )
    enum = tvm.get_model_weights(spec.id)
    if spec.weights == LOCAL:
        raise WeightsError(f"torchvision has no @local weights: torchvision:{spec.id} reads the torch hub cache "
                           f"when the file is there (see `backbench models --source torchvision`), or give @PATH")
    tags = enum.__members__
    if spec.weights is None or spec.weights in tags:
        weights = tags[spec.weights or "DEFAULT"]
        model, has_logits, note = _pretrained(spec, weights)
    else:
        weights = enum.DEFAULT
        model, has_logits, note = _offline(spec)
    tower = ClassifierTower(model, _head(model), has_logits)
    return Backbone(spec, tower, _preprocess(weights), _forward, has_logits, note)
