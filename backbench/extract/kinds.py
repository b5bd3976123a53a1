"""The forward passes behind the feature kinds of :mod:`backbench.kinds` (torch, timm)."""

from __future__ import annotations

from typing import Any

from backbench.errors import BackbenchError
from backbench.kinds import (VIEWS, check_view, expand, is_map, parse_kind, probe_kinds, split_name,  # noqa: F401
                             stored_kind)

Grid = tuple[int, int]


def _grid(model, x, n_tokens: int, what: str) -> Grid:
    """The patch grid (h, w) of ViT tokens of input ``x``, from timm's patch embedding."""
    embed = getattr(model, "patch_embed", None)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size(size)
    elif getattr(embed, "grid_size", None) is not None:
        h, w = embed.grid_size
    else:
        h = w = int(round(n_tokens ** 0.5))
    if h * w != n_tokens:
        raise BackbenchError(f"{what}: {n_tokens} patch tokens do not form its {h}x{w} patch grid; "
                             f"the map kind needs a ViT with a patch grid or a CNN")
    return int(h), int(w)


def to_map(model, x, tokens, prefix: int, what: str, grid: Grid | None = None):
    """The spatial map (B, h, w, D) of ``tokens``: ViT tokens (B, N, D) without their ``prefix``
    tokens in their patch grid, or a CNN's NCHW map (NHWC where timm says ``output_fmt``);
    ``grid`` pools it down to (H, W) by adaptive average pooling."""
    import torch

    if tokens.ndim == 4:
        fmap = tokens if getattr(model, "output_fmt", "NCHW") == "NHWC" else tokens.permute(0, 2, 3, 1)
    elif tokens.ndim == 3:
        patches = tokens[:, prefix:]
        h, w = _grid(model, x, patches.shape[1], what)
        fmap = patches.reshape(patches.shape[0], h, w, patches.shape[2])
    else:
        raise BackbenchError(f"{what} gives features of shape {tuple(tokens.shape)}, not a map or tokens")
    if grid is None:
        return fmap
    h, w = fmap.shape[1:3]
    if grid[0] > h or grid[1] > w:
        raise BackbenchError(f"--map-grid {grid[0]} {grid[1]} is larger than {what}'s {h}x{w} map; "
                             f"give at most {h} {w} (maps are pooled down, never up)")
    pooled = torch.nn.functional.adaptive_avg_pool2d(fmap.permute(0, 3, 1, 2).float(), grid)
    return pooled.to(fmap.dtype).permute(0, 2, 3, 1)


def _tokens_to(base: str, tokens, prefix: int, what: str):
    """cls / mean-patch / both from ViT tokens (B, N, D) with ``prefix`` leading tokens."""
    import torch

    if tokens.ndim == 4:  # a CNN feature map (B, C, H, W): no class token
        if "cls" in base:
            raise BackbenchError(f"feature kind {base!r} needs a class token; {what} is a CNN: use mean-patch")
        return tokens.mean((2, 3))
    if "cls" in base and prefix < 1:
        raise BackbenchError(f"feature kind {base!r} needs a class token; {what} has none: use mean-patch")
    cls, mean = tokens[:, 0], tokens[:, prefix:].mean(1)
    return {"cls": cls, "mean-patch": mean, "cls+mean-patch": torch.cat([cls, mean], 1)}[base]


def kinds_forward(backbone: Any, x, kinds: list[str], map_grid: Grid | None = None) -> tuple[dict[str, Any], Any]:
    """``({kind: features}, logits or None)`` for one normalized batch: (B, D_kind) features,
    (B, h, w, d) for the map kinds (pooled to ``map_grid`` where given)."""
    out: dict[str, Any] = {}
    logits = None
    if "pooled" in kinds:
        out["pooled"], logits = backbone.forward(x)
    rest = [k for k in kinds if k != "pooled"]
    if not rest:
        return out, logits
    model = backbone.model
    if not hasattr(model, "forward_features"):
        raise BackbenchError(f"feature kinds other than pooled need a timm backbone; {backbone.name} is not one")
    prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    finals = [k for k in rest if parse_kind(k)[0] is None]
    if finals:
        tokens = model.forward_features(x)
        for k in finals:
            out[k] = (to_map(model, x, tokens, prefix, backbone.name, map_grid) if k == "map"
                      else _tokens_to(k, tokens, prefix, backbone.name))
    layered = sorted({parse_kind(k)[0] for k in rest if parse_kind(k)[0] is not None})
    if layered:
        out.update(_layers(model, x, layered, [k for k in rest if parse_kind(k)[0] is not None], prefix,
                           backbone.name, map_grid))
    return out, logits


def _layers(model, x, layers: list[int], kinds: list[str], prefix: int, what: str,
            map_grid: Grid | None = None) -> dict[str, Any]:
    """Intermediate blocks through timm's ``forward_intermediates`` (final norm applied)."""
    import torch

    if not hasattr(model, "forward_intermediates"):
        raise BackbenchError(f"--layers needs timm's forward_intermediates; {what} does not have it")
    n_blocks = len(getattr(model, "blocks", getattr(model, "stages", [])) or [])
    if n_blocks and max(layers) > n_blocks:
        raise BackbenchError(f"{what} has {n_blocks} blocks; --layers goes down to -{n_blocks}")
    take = sorted(layers, reverse=True)  # timm returns blocks in forward order: earliest first
    indices = [-n for n in take]
    try:
        got = model.forward_intermediates(x, indices=indices, norm=True, intermediates_only=True,
                                          **({"return_prefix_tokens": True} if prefix else {}))
    except TypeError:  # models without the norm / prefix options
        got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    out = {}
    for n, item in zip(take, got):
        spatial = item[0] if isinstance(item, tuple) else item  # ViT: (spatial NCHW, prefix tokens)
        if isinstance(item, tuple):
            tokens = torch.cat([item[1], spatial.flatten(2).transpose(1, 2)], 1)
        else:
            tokens = item
        for k in kinds:
            layer, base = parse_kind(k)
            if layer != n:
                continue
            if base == "map":  # timm gives intermediates NCHW whatever the model's output_fmt
                out[k] = to_map(None, x, spatial, 0, what, map_grid) if spatial.ndim == 4 else \
                    to_map(model, x, spatial, prefix, what, map_grid)
            else:
                out[k] = _tokens_to(base, tokens, prefix if isinstance(item, tuple) else 0, what)
    return out


def for_maps(backbone: Any) -> Any:
    """``backbone`` with its preprocessing resizing the whole image to the input size (no crop),
    as map kinds are extracted; a copy, so the caller's backbone keeps its own."""
    import copy
    from dataclasses import replace

    if backbone.preprocess.resize == "full":
        return backbone
    full = copy.copy(backbone)
    full.preprocess = replace(backbone.preprocess, resize="full")
    return full


def human_bytes(n: float) -> str:
    """``60211200`` -> ``"60.2 MB"`` (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def size_line(rows: int, shapes: dict[str, list[int]], dtype: str) -> str:
    """What a map extraction will write, said before it starts:
    ``"writing about 60.2 MB: 200 maps of 14x14x768 float16"`` (each kind named when several)."""
    import numpy as np

    itemsize = np.dtype(dtype).itemsize
    total = sum(rows * int(np.prod(s)) * itemsize for s in shapes.values())
    dims = {k: "x".join(map(str, s)) for k, s in shapes.items()}
    what = next(iter(dims.values())) if len(dims) == 1 else \
        ", ".join(f"{d} ({k})" for k, d in dims.items())
    return f"writing about {human_bytes(total)}: {rows} maps of {what} {np.dtype(dtype).name}"
