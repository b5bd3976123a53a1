"""Our ``nn.Module`` wrappers around third-party models: they hold what backbench needs to know
about a model (which layer feeds the classifier, how to pool), so the wrapped model is never
given attributes of ours.

This module imports torch at the top: the sources import it inside their loaders.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class ClassifierTower(nn.Module):
    """A torchvision classifier whose ``forward(x)`` is ``(features, logits or None)``.

    Features are the input of the classifier layer ``head`` (globally average-pooled if it is a
    map); logits are the model's output, kept only when ``with_logits`` (a real, trained head).
    Attribute lookups the tower does not answer fall through to the wrapped model, so
    ``tower.fc`` or ``tower.features`` are the classifier's; the tower's own attributes carry a
    ``_backbench_`` prefix so that they never hide one of the model's.
    """

    def __init__(self, net: nn.Module, head: str, with_logits: bool) -> None:
        super().__init__()
        self.net = net
        self._backbench_head = head
        self._backbench_logits = with_logits

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "net":
                raise
            return getattr(self.net, name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the hook lives for one call, so the wrapped model keeps no state of ours
        seen: list[torch.Tensor] = []
        hook = self.net.get_submodule(self._backbench_head).register_forward_pre_hook(
            lambda m, args: seen.append(args[0]))
        try:
            out = self.net(x)
        finally:
            hook.remove()
        feats = seen[-1]
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats, (out if self._backbench_logits else None)


class HFImageTower(nn.Module):
    """A transformers model whose ``forward(x)`` is the image embedding.

    ``pool``: ``pooler`` (``pooler_output``, flattened), ``cls`` (``last_hidden_state[:, 0]``)
    or ``mean`` (the mean of the final feature map or tokens). Models with a text tower
    (CLIP, SigLIP) keep only ``vision_model`` and ``visual_projection``: their
    ``get_image_features``.
    """

    def __init__(self, base: Any, pool: str) -> None:
        super().__init__()
        towered = hasattr(base, "get_image_features") and hasattr(base, "vision_model")
        self.vision = base.vision_model if towered else base
        self.proj = getattr(base, "visual_projection", None) if towered else None
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=x, return_dict=True)
        pooled = getattr(out, "pooler_output", None)
        if self.proj is not None:
            return self.proj(pooled)
        if self.pool == "pooler" and pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        if hidden.ndim == 3:
            return hidden[:, 0] if self.pool in ("pooler", "cls") else hidden.mean(dim=1)
        return hidden.mean(dim=tuple(range(2, hidden.ndim)))
