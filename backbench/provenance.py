"""Library versions recorded with every cache group and results record."""

from __future__ import annotations

CORE = ("backbench", "torch", "torchvision", "timm", "open_clip_torch", "zarr", "numpy", "pillow")


def library_versions(*extra: str) -> dict[str, str]:
    """``{package: version}`` for the core packages plus ``extra`` ("absent" if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in CORE + extra:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out
