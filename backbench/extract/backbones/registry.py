"""The registry's data: parsed names, loaded backbones and the table of sources.

Every source module (``timm.py``, ``hf.py``, ... and plugins) imports this module and
registers its loader with :func:`register_source`; the package ``__init__`` imports the source
modules and resolves names. This module imports no source, so nothing here is circular.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backbench.errors import BackboneNotFound
from backbench.extract.backbones.weights import state_dict_sha256
from backbench.extract.preprocess import Preprocess

RANDOM = "random"
LOCAL = "local"
DOWNLOAD_NOTE = "download from the hub; or @random / @PATH"


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone name. ``weights`` is None for the source's default (hub) weights."""

    source: str
    id: str
    weights: str | None = None

    @classmethod
    def parse(cls, name: str) -> BackboneSpec:
        """Split ``SOURCE:ID[@WEIGHTS]`` once, on the first ``:`` and then the first ``@``."""
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
        """The weights file ``@PATH`` names; None for the default, ``@random`` and ``@local``."""
        if self.weights in (None, RANDOM, LOCAL):
            return None
        return Path(self.weights).expanduser()


ForwardFn = Callable[[Any, Any], tuple[Any, Any]]


@dataclass
class Backbone:
    """A loaded frozen backbone: ``forward(x) -> (features, logits or None)``.

    Everything backbench knows about the model lives here (or in the ``forward_fn`` it holds),
    never as attributes set on the third-party module.
    """

    spec: BackboneSpec
    model: Any
    preprocess: Preprocess
    forward_fn: ForwardFn
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

    def forward(self, x: Any) -> tuple[Any, Any]:
        return self.forward_fn(self.model, x)

    def describe(self) -> dict[str, Any]:
        """The provenance a cache group records about its backbone."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_note": self.weights_note,
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "n_params": self.n_params,
            "preprocess": self.preprocess.to_dict(),
        }


Loader = Callable[[BackboneSpec], Backbone]


@dataclass(frozen=True)
class Source:
    """One backbone source: how to load a spec and how to list what can be named.

    ``weight_tags(id)`` names the ``@TAG`` weights a source knows besides random/local/PATH;
    ``catalog_note`` is the weights column of ``backbench models`` for names not on this
    machine; ``about`` is a line ``backbench models --source NAME`` prints after the table.
    """

    name: str
    load: Loader
    list_ids: Callable[[], list[str]]
    on_machine: Callable[[], list[tuple[str, str]]]
    validate: Callable[[str], bool]
    weight_tags: Callable[[str], list[str]] = field(default=lambda ident: [])
    catalog_note: str = DOWNLOAD_NOTE
    about: str = ""


SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    *,
    list_ids: Callable[[], list[str]],
    validate: Callable[[str], bool],
    on_machine: Callable[[], list[tuple[str, str]]] = list,
    weight_tags: Callable[[str], list[str]] | None = None,
    catalog_note: str = DOWNLOAD_NOTE,
    about: str = "",
) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(spec) -> Backbone`` as the loader of ``name:...`` backbones.

    Plugins call it too: a package declares
    ``[project.entry-points."backbench.backbones"] mysrc = "pkg.module:register"`` and
    ``register(register_source)`` is called when the registry is first used.
    """

    def deco(fn: Loader) -> Loader:
        SOURCES[name] = Source(name, fn, list_ids, on_machine, validate, weight_tags or (lambda ident: []),
                               catalog_note, about)
        return fn

    return deco
