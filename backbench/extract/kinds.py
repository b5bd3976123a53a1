"""The forward passes behind the feature kinds of :mod:`backbench.kinds` (torch, timm)."""

from __future__ import annotations

from typing import Any

from backbench.errors import BackbenchError
from backbench.kinds import (VIEWS, check_view, expand, parse_kind, probe_kinds, split_name,  # noqa: F401
                             stored_kind)


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


def kinds_forward(backbone: Any, x, kinds: list[str]) -> tuple[dict[str, Any], Any]:
    """``({kind: (B, D_kind) features}, logits or None)`` for one normalized batch."""
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
            out[k] = _tokens_to(k, tokens, prefix, backbone.name)
    layered = sorted({parse_kind(k)[0] for k in rest if parse_kind(k)[0] is not None})
    if layered:
        out.update(_layers(model, x, layered, [k for k in rest if parse_kind(k)[0] is not None], prefix,
                           backbone.name))
    return out, logits


def _layers(model, x, layers: list[int], kinds: list[str], prefix: int, what: str) -> dict[str, Any]:
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
        if isinstance(item, tuple):  # ViT: (spatial NCHW, prefix tokens)
            spatial, pre = item
            tokens = torch.cat([pre, spatial.flatten(2).transpose(1, 2)], 1)
        else:
            tokens = item
        for k in kinds:
            if parse_kind(k)[0] == n:
                out[k] = _tokens_to(parse_kind(k)[1], tokens, prefix if isinstance(item, tuple) else 0, what)
    return out
