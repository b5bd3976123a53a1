"""The backbone registry: names ``SOURCE:ID[@WEIGHTS]`` -> loaded, frozen models.

As in timm's ``_registry.py``, sources register themselves by decorator; a name is split
once on the first ``:`` and the id stays opaque to the core. ``WEIGHTS`` is ``random``,
``local`` (weights a known package put on this machine), a path to a state dict, or a tag
the source names (torchvision's ``@IMAGENET1K_V2``).

Sources built in: ``timm:``, ``open_clip:``, ``torchvision:``, ``hf:`` (see
:mod:`backbench.extract.sources`) and ``custom:`` (any ``nn.Module``, see
:func:`custom_backbone`). Packages add their own through the ``backbench.backbones`` entry
point group: each entry point names a function that gets :func:`register_source`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.preprocess import Preprocess

RANDOM = "random"
LOCAL = "local"


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone name. ``weights`` is None for the source's default (hub) weights."""

    source: str
    id: str
    weights: str | None = None

    @classmethod
    def parse(cls, name: str) -> BackboneSpec:
        source, sep, rest = name.partition(":")
        if not sep or not source or not rest:
            raise BackboneNotFound(
                f"backbone {name!r} is not SOURCE:ID[@WEIGHTS]; try for example "
                f"timm:resnet18@random (sources: {', '.join(sorted(SOURCES)) or 'none'})"
            )
        ident, at, weights = rest.partition("@")
        if at and not weights:
            raise BackboneNotFound(f"backbone {name!r} ends in '@': name weights after it, e.g. @random")
        return cls(source.lower(), ident, weights or None)

    def __str__(self) -> str:
        return f"{self.source}:{self.id}" + (f"@{self.weights}" if self.weights else "")

    @property
    def weights_path(self) -> Path | None:
        if self.weights in (None, RANDOM, LOCAL):
            return None
        return Path(self.weights).expanduser()


@dataclass
class Backbone:
    """A loaded frozen backbone: ``forward(x) -> (features, logits or None)``."""

    spec: BackboneSpec
    model: Any
    preprocess: Preprocess
    forward_fn: Callable[[Any, Any], tuple[Any, Any]]
    has_logits: bool
    weights_note: str
    feature_dim: int = 0
    num_classes: int = 0
    n_params: int = 0
    weights_sha256: str = field(default="")

    def __post_init__(self) -> None:
        import torch

        self.model.eval().requires_grad_(False)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.weights_sha256 = self.weights_sha256 or state_dict_sha256(self.model.state_dict())
        if not self.feature_dim:
            c, h, w = self.preprocess.input_size
            with torch.inference_mode():
                feats, logits = self.forward(torch.zeros(1, c, h, w))
            self.feature_dim = int(feats.shape[-1])
            self.num_classes = int(logits.shape[-1]) if logits is not None else 0

    @property
    def name(self) -> str:
        return str(self.spec)

    def forward(self, x):
        return self.forward_fn(self.model, x)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_note": self.weights_note,
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "n_params": self.n_params,
            "preprocess": self.preprocess.to_dict(),
        }


DOWNLOAD_NOTE = "download from the hub; or @random / @PATH"


@dataclass(frozen=True)
class Source:
    """One backbone source: how to load a spec and how to list what can be named.

    ``weight_tags(id)`` names the ``@TAG`` weights a source knows besides random/local/PATH;
    ``catalog_note`` is the weights column of ``backbench models`` for names not on this
    machine; ``about`` is a line ``backbench models --source NAME`` prints after the table.
    """

    name: str
    load: Callable[[BackboneSpec], Backbone]
    list_ids: Callable[[], list[str]]
    on_machine: Callable[[], list[tuple[str, str]]]
    validate: Callable[[str], bool]
    weight_tags: Callable[[str], list[str]] = field(default=lambda ident: [])
    catalog_note: str = DOWNLOAD_NOTE
    about: str = ""


SOURCES: dict[str, Source] = {}
PLUGIN_GROUP = "backbench.backbones"
log = logging.getLogger("backbench")


def register_source(
    name: str,
    *,
    list_ids: Callable[[], list[str]],
    validate: Callable[[str], bool],
    on_machine: Callable[[], list[tuple[str, str]]] = list,
    weight_tags: Callable[[str], list[str]] | None = None,
    catalog_note: str = DOWNLOAD_NOTE,
    about: str = "",
) -> Callable[[Callable[[BackboneSpec], Backbone]], Callable[[BackboneSpec], Backbone]]:
    """Decorator: register ``fn(spec) -> Backbone`` as the loader of ``name:...`` backbones.

    Plugins call it too: a package declares
    ``[project.entry-points."backbench.backbones"] mysrc = "pkg.module:register"`` and
    ``register(register_source)`` is called when the registry is first used.
    """

    def deco(fn: Callable[[BackboneSpec], Backbone]) -> Callable[[BackboneSpec], Backbone]:
        SOURCES[name] = Source(name, fn, list_ids, on_machine, validate, weight_tags or (lambda ident: []),
                               catalog_note, about)
        return fn

    return deco


_plugins_loaded = False


def _ensure_sources() -> None:
    global _plugins_loaded
    from backbench.extract import sources  # noqa: F401  (registers timm, open_clip, torchvision, hf)

    if not _plugins_loaded:
        _plugins_loaded = True
        load_plugins()


def load_plugins() -> list[str]:
    """Call every ``backbench.backbones`` entry point with :func:`register_source`.

    A plugin that fails to import or to register is reported in one warning line and
    skipped; the names of the plugins that loaded are returned.
    """
    loaded = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()(register_source)
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            log.warning("backbench: backbone plugin %r (%s) failed to load and is skipped: %s: %s",
                        ep.name, ep.value, type(exc).__name__, first)
            continue
        loaded.append(ep.name)
    return loaded


def resolve(name: str) -> tuple[BackboneSpec, Source]:
    """Parse and check a name without loading weights; typos fail here with suggestions."""
    _ensure_sources()
    spec = BackboneSpec.parse(name)
    source = SOURCES.get(spec.source)
    if source is None:
        close = difflib.get_close_matches(spec.source, SOURCES, n=1)
        hint = f"; did you mean {close[0]}:{spec.id}?" if close else ""
        raise BackboneNotFound(f"unknown backbone source {spec.source!r}{hint} (sources: {', '.join(sorted(SOURCES))})")
    if not source.validate(spec.id):
        close = difflib.get_close_matches(spec.id, source.list_ids(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'{spec.source}:{c}' for c in close)}?" if close else ""
        raise BackboneNotFound(
            f"unknown {spec.source} model {spec.id!r}{hint} (see `backbench models --source {spec.source}`)"
        )
    path = spec.weights_path
    if path is not None and not path.is_file():
        tags = source.weight_tags(spec.id)
        if spec.weights in tags:
            return spec, source
        also = ""
        if tags:
            close = difflib.get_close_matches(spec.weights, tags, n=1)
            also = (f"; did you mean {spec.source}:{spec.id}@{close[0]}?" if close else "") + \
                f" ({spec.source}:{spec.id} also takes @{', @'.join(tags)})"
        raise WeightsError(f"weights file {str(path)!r} does not exist; give a .safetensors or .pth path, "
                           f"or @random{also}")
    return spec, source


def load_backbone(name: str | BackboneSpec) -> Backbone:
    """Load a backbone by name, in eval mode with gradients off."""
    spec, source = resolve(str(name))
    return source.load(spec)


def state_dict_sha256(state_dict: dict[str, Any]) -> str:
    """A name-independent hash of the weights: tensor shapes, dtypes and bytes, in order."""
    import torch

    h = hashlib.sha256()
    for tensor in state_dict.values():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, Any]:
    """Read weights safely: safetensors, or ``torch.load(weights_only=True)``; never unpickle."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights {str(path)!r} as safetensors or a plain torch state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise WeightsError(f"{str(path)!r} holds no state dict of tensors")
    return sd


def _params(sd: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def apply_state_dict(model: Any, sd: dict[str, Any], head_keys: set[str]) -> tuple[bool, str]:
    """Load ``sd`` into ``model`` by name, else by position when count, order and shapes match.

    Returns (whether the classifier head got real weights, a note saying how it loaded).
    """
    own = model.state_dict()
    if set(k for k, _ in _params(sd)) == set(k for k, _ in _params(own)):
        model.load_state_dict(sd, strict=False)
        return True, f"loaded {len(sd)} tensors by name"
    if set(k for k, _ in _params(sd)) == set(k for k, _ in _params(own)) - head_keys:
        model.load_state_dict(sd, strict=False)
        return False, f"loaded {len(sd)} tensors by name (no classifier head in the file)"
    theirs = _params(sd)
    for with_head in (True, False):
        mine = [(k, v) for k, v in _params(own) if with_head or k not in head_keys]
        if len(mine) == len(theirs) and all(a.shape == b.shape for (_, a), (_, b) in zip(mine, theirs)):
            mapped = {k: v for (k, _), (_, v) in zip(mine, theirs)}
            model.load_state_dict(mapped, strict=False)
            return with_head, (
                f"loaded {len(mapped)} tensors by position: key names differ from the "
                f"architecture's but count, order and shapes match"
            )
    raise WeightsError(
        f"weights do not fit the architecture: {len(theirs)} tensors in the file, "
        f"{len(_params(own))} in the model, and names/shapes do not line up; check the model name"
    )


# ------------------------------------------------------------------------- custom

_CUSTOM: dict[str, Backbone] = {}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        mean=tuple(float(v) for v in preprocess.get("mean", _IMAGENET_MEAN)),
        std=tuple(float(v) for v in preprocess.get("std", _IMAGENET_STD)),
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

    def forward_fn(m, x):
        out = forward(m, x) if forward is not None else m(x)
        feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        return (feats.flatten(1) if feats.ndim > 2 else feats), logits

    bb = Backbone(BackboneSpec("custom", ident), model, _as_preprocess(preprocess), forward_fn, False,
                  weights_note or f"custom nn.Module {type(model).__name__} (custom_backbone)")
    bb.has_logits = bb.num_classes > 0
    _CUSTOM[ident] = bb
    return bb


def _load_custom(spec: BackboneSpec) -> Backbone:
    if spec.weights is not None:
        raise WeightsError(f"custom:{spec.id} takes no @weights: load them into the module before custom_backbone()")
    return _CUSTOM[spec.id]


register_source(
    "custom", list_ids=lambda: sorted(_CUSTOM), validate=lambda ident: ident in _CUSTOM,
    on_machine=lambda: [(f"custom:{k}", "in this Python process (custom_backbone)") for k in sorted(_CUSTOM)],
    catalog_note="in this Python process (custom_backbone)",
    about="custom:NAME backbones exist in the Python process that made them with "
          "backbench.extract.backbones.custom_backbone(name, module, preprocess)",
)(_load_custom)
