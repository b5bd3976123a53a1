"""The ``custom:`` source: any ``nn.Module`` made in this Python process (:func:`custom_backbone`)."""

from __future__ import annotations

from typing import Any, Callable

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones.registry import Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import IMAGENET_MEAN, IMAGENET_STD
from backbench.extract.preprocess import Preprocess

_CUSTOM: dict[str, Backbone] = {}


def _as_preprocess(preprocess: Preprocess | dict[str, Any]) -> Preprocess:
    if isinstance(preprocess, Preprocess):
        return preprocess
    if not isinstance(preprocess, dict) or "input_size" not in preprocess:
        raise BackboneNotFound("custom_backbone: preprocess is a Preprocess or a dict with at least input_size "
                               "(e.g. {'input_size': (3, 224, 224), 'mean': ..., 'std': ..., "
                               "'interpolation': 'bicubic', 'crop_pct': 0.875})")
    size = preprocess["input_size"]
    size = (3, int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(size) == 2:
        size = (3, *size)
    return Preprocess(
        input_size=size,
        mean=tuple(float(v) for v in preprocess.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in preprocess.get("std", IMAGENET_STD)),
        interpolation=str(preprocess.get("interpolation", "bicubic")),
        crop_pct=float(preprocess.get("crop_pct", 0.875)),
    )


def custom_backbone(
    name: str,
    model: Any,
    preprocess: Preprocess | dict[str, Any],
    forward: Callable[[Any, Any], Any] | None = None,
    weights_note: str = "",
) -> Backbone:
    """Any ``nn.Module`` as a backbone, for :func:`backbench.extract.run.extract`.

    ``name`` is ``custom:NAME`` (a bare ``NAME`` gets the prefix), the backbone's name in the
    cache. ``preprocess`` is a :class:`Preprocess` or a dict of its fields (``input_size``
    required; ImageNet mean/std, bicubic and crop_pct 0.875 by default). ``forward(model, x)``
    returns the features, or ``(features, logits)``; by default the features are ``model(x)``
    (flattened to one row per image) and there are no logits. The backbone is also loadable by name in this process
    (``load_backbone("custom:NAME")``), e.g. by a battle run in the same interpreter::

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        bb = custom_backbone("custom:tiny", net, {"input_size": (3, 32, 32)})
        extract(bb, "digits", cache="features.zarr", dataset="digits", split="test")
    """
    source, sep, ident = name.partition(":")
    if not sep:
        source, ident = "custom", name
    if source != "custom" or not ident or "@" in ident:
        raise BackboneNotFound(f"custom backbone name {name!r}: use custom:NAME (NAME without ':' or '@'), so that "
                               f"it cannot be taken for a {source} backbone in the cache")

    def forward_fn(m: Any, x: Any) -> tuple[Any, Any]:
        out = forward(m, x) if forward is not None else m(x)
        feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        return (feats.flatten(1) if feats.ndim > 2 else feats), logits

    bb = Backbone(BackboneSpec("custom", ident), model, _as_preprocess(preprocess), forward_fn, False,
                  weights_note or f"custom nn.Module {type(model).__name__} (custom_backbone)")
    bb.has_logits = bb.num_classes > 0
    _CUSTOM[ident] = bb
    return bb


@register_source(
    "custom", list_ids=lambda: sorted(_CUSTOM), validate=lambda ident: ident in _CUSTOM,
    on_machine=lambda: [(f"custom:{k}", "in this Python process (custom_backbone)") for k in sorted(_CUSTOM)],
    catalog_note="in this Python process (custom_backbone)",
    about="custom:NAME backbones exist in the Python process that made them with "
          "backbench.extract.backbones.custom_backbone(name, module, preprocess)",
)
def load_custom(spec: BackboneSpec) -> Backbone:
    """The backbone :func:`custom_backbone` made under this name in this process."""
    if spec.weights is not None:
        raise WeightsError(f"custom:{spec.id} takes no @weights: load them into the module before custom_backbone()")
    return _CUSTOM[spec.id]
