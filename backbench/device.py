"""Which torch device to run on: a light module (torch is imported only when asked)."""

from __future__ import annotations

from backbench.errors import BackbenchError


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; a CUDA device torch cannot see is refused."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackbenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return device


def default_batch_size(device: str) -> int:
    """256 images per batch on a GPU (fills an H100 with a ViT-B/16 in bf16), 64 on a CPU."""
    return 256 if device.startswith("cuda") else 64
