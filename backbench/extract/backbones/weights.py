"""Weights files and what every source shares about weights: reading a state dict safely,
fitting it to an architecture, hashing it, seeding random init, and ImageNet defaults.

torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from backbench.errors import WeightsError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def seeded() -> None:
    """Seed torch before a random init: random weights are part of the cache key, so they
    must be the same in every run."""
    import torch

    torch.manual_seed(0)


def crop_pct(crop: int, resize: int) -> float:
    """``crop / resize``, nudged down when float rounding would make ``floor(crop / pct)`` miss ``resize``."""
    pct = min(crop / resize, 1.0)
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


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
