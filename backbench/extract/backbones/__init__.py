"""The backbone registry: names ``SOURCE:ID[@WEIGHTS]`` -> loaded, frozen models.

As in timm's ``_registry.py``, sources register themselves by decorator
(:func:`~backbench.extract.backbones.registry.register_source`); a name is split once on the
first ``:`` and the id stays opaque to the core. ``WEIGHTS`` is ``random``, ``local`` (weights
a known package put on this machine), a path to a state dict, or a tag the source names
(torchvision's ``@IMAGENET1K_V2``).

One module per source, each imported below so that its loader is registered: ``timm:``,
``open_clip:``, ``torchvision:``, ``hf:`` (transformers), ``diffusers:`` (the Stable Diffusion
backbone) and ``custom:`` (any ``nn.Module``,
see :func:`custom_backbone`). They share :mod:`.hub` (reachability, offline mode, quiet
weights-only loading) and :mod:`.weights` (state dicts). Packages add their own sources
through the ``backbench.backbones`` entry point group: each entry point names a function that
gets :func:`register_source`. The libraries themselves are imported lazily, when a name of
theirs is resolved or loaded.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging

from backbench.errors import BackboneNotFound, WeightsError
# each source registers its loader when imported; in this order `backbench models` lists them
from backbench.extract.backbones import custom, timm, open_clip, torchvision, hf, diffusers  # noqa: F401
from backbench.extract.backbones.custom import custom_backbone
from backbench.extract.backbones.registry import (
    DOWNLOAD_NOTE,
    LOCAL,
    RANDOM,
    SOURCES,
    Backbone,
    BackboneSpec,
    Source,
    register_source,
)
from backbench.extract.backbones.weights import apply_state_dict, read_state_dict, state_dict_sha256

__all__ = [
    "DOWNLOAD_NOTE", "LOCAL", "PLUGIN_GROUP", "RANDOM", "SOURCES", "Backbone", "BackboneSpec", "Source",
    "apply_state_dict", "custom_backbone", "ensure_sources", "load_backbone", "load_plugins", "read_state_dict",
    "register_source", "resolve", "state_dict_sha256",
]

PLUGIN_GROUP = "backbench.backbones"
log = logging.getLogger("backbench")
_plugins_loaded = False


def ensure_sources() -> None:
    """Load the entry-point plugins once, so that :data:`SOURCES` holds every source."""
    global _plugins_loaded
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


def _check_weights(spec: BackboneSpec, source: Source) -> None:
    """A ``@WEIGHTS`` that is no file must be one of the source's tags; else say what is."""
    path = spec.weights_path
    if path is None or path.is_file():
        return
    tags = source.weight_tags(spec.id)
    if spec.weights in tags:
        return
    also = ""
    if tags:
        close = difflib.get_close_matches(spec.weights, tags, n=1)
        also = (f"; did you mean {spec.source}:{spec.id}@{close[0]}?" if close else "") + \
            f" ({spec.source}:{spec.id} also takes @{', @'.join(tags)})"
    raise WeightsError(f"weights file {str(path)!r} does not exist; give a .safetensors or .pth path, "
                       f"or @random{also}")


def resolve(name: str) -> tuple[BackboneSpec, Source]:
    """Parse and check a name without loading weights; typos fail here with suggestions."""
    ensure_sources()
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
    _check_weights(spec, source)
    return spec, source


def load_backbone(name: str | BackboneSpec) -> Backbone:
    """Load a backbone by name, in eval mode with gradients off."""
    spec, source = resolve(str(name))
    return source.load(spec)
