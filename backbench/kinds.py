"""Kinds of features beyond the pooled embedding, and test-time views.

A kind is ``[layer-N:]BASE`` with BASE one of

* ``pooled`` — the backbone's own embedding (its pre-logits): the default;
* ``cls`` — the class token after the final norm (ViTs);
* ``mean-patch`` — the mean of the patch tokens (ViTs) or of the final feature map (CNNs);
* ``cls+mean-patch`` — both, concatenated: DINOv2's linear-probe input;
* ``map`` — the spatial feature map (h, w, d): a ViT's patch tokens after the final norm in
  their grid, a CNN's last feature map; stored row-major as ``h*w*d`` features with the group
  attribute ``map_shape``, for dense probes. Map kinds see the whole image resized to the
  model's input (no crop), so they are extracted in runs of their own;

and ``layer-N:`` taking BASE from the N-th block from the end (``layer-1`` is the last)
through timm's ``forward_intermediates`` (final norm applied, as DINOv2 does). Each kind is
stored as its own feature matrix: the group of ``SPLIT`` for ``pooled``, a sibling group
``SPLIT~KIND`` for the others, with its own checksums and provenance (``feature_kind``), so
merge, pack, verify and export treat it like any group. Probes pick one with ``--features
KIND``, or a concatenation with ``--features K1,K2`` (``lastN:BASE`` is
``layer-1:BASE,...,layer-N:BASE``, DINOv2's concatenation of the last blocks).

Views: ``center`` (the default), ``flip`` (the mirrored image), or ``center+flip`` (the
features of both, averaged). A view other than center is part of the stored kind's name
(``cls@flip``, group ``SPLIT~cls@flip``), so the views of one split are stored side by side.
"""

from __future__ import annotations

import re

from backbench.errors import BackbenchError

VIEWS = ("center", "flip", "center+flip")
_KIND = re.compile(r"^(?:layer-(\d+):)?(pooled|cls|mean-patch|cls\+mean-patch|map)(?:@(flip|center\+flip))?$")


def parse_kind(kind: str) -> tuple[int | None, str]:
    """``"layer-4:cls"`` -> ``(4, "cls")``; ``"pooled"`` -> ``(None, "pooled")``; a stored kind may
    end in its view (``cls@flip``, as probes name it)."""
    m = _KIND.match(kind or "")
    if not m or (m.group(1) and m.group(2) == "pooled") or (m.group(1) and int(m.group(1)) < 1):
        raise BackbenchError(f"feature kind {kind!r}: use pooled, cls, mean-patch, cls+mean-patch, map, or "
                             f"layer-N:cls / layer-N:mean-patch / layer-N:map (N >= 1 blocks from the end), with "
                             f"@flip or @center+flip for other views (not of maps)")
    if m.group(2) == "map" and m.group(3):
        raise BackbenchError(f"feature kind {kind!r}: maps are stored for the center view only; use map")
    return (int(m.group(1)) if m.group(1) else None), m.group(2)


def is_map(kind: str) -> bool:
    """Whether ``kind`` is a spatial feature map (``map``, ``layer-N:map``)."""
    return parse_kind(kind)[1] == "map"


def stored_kind(kind: str, view: str) -> str:
    """The name a kind is stored (and probed) under: ``cls`` for the center view, else ``cls@flip``."""
    return kind if view == "center" else f"{kind}@{view}"


def expand(features: list[str] | None, layers: list[int] | None) -> list[str]:
    """The kinds to extract: ``features`` (default pooled) plus each non-pooled base at every
    layer in ``layers`` (``-4`` or ``4``: the 4th block from the end)."""
    kinds = list(dict.fromkeys(features or ["pooled"]))
    for k in kinds:
        parse_kind(k)
        if "@" in k:
            raise BackbenchError(f"feature kind {k!r}: extract views with --views {k.split('@')[1]}")
    bases = [k for k in kinds if parse_kind(k)[0] is None and k != "pooled"] or ["cls"]
    for layer in layers or []:
        if int(layer) == 0:
            raise BackbenchError("--layers counts blocks from the end: -1 is the last block, -4 the fourth last")
        kinds += [f"layer-{abs(int(layer))}:{b}" for b in bases]
    kinds = list(dict.fromkeys(kinds))
    maps = [k for k in kinds if is_map(k)]
    if maps and len(maps) < len(kinds):
        others = [k for k in kinds if not is_map(k)]
        raise BackbenchError(f"feature kinds {', '.join(maps)} (whole image, no crop) and {', '.join(others)} "
                             f"(center crop) see different inputs: extract them in two runs, "
                             f"--features {' '.join(maps)} and --features {' '.join(others)}")
    return kinds


def split_name(split: str, kind: str) -> str:
    """The cache split that holds ``kind``: ``test`` for pooled, ``test~layer-4.cls`` otherwise."""
    parse_kind(kind)
    return split if kind == "pooled" else f"{split}~{kind.replace(':', '.')}"


def probe_kinds(spec: str | None) -> list[str]:
    """``--features`` of a probe -> the kinds whose features are concatenated (``lastN:BASE`` expands)."""
    out: list[str] = []
    for part in (spec or "pooled").split(","):
        part = part.strip()
        m = re.match(r"^last(\d+):(.+)$", part)
        out += [f"layer-{i}:{m.group(2)}" for i in range(1, int(m.group(1)) + 1)] if m else [part]
    for k in out:
        parse_kind(k)
    return out


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise BackbenchError(f"--views {view!r}: use center, flip or center+flip")
    return view
