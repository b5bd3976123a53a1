"""Shared fixtures: generated images, tiny random-init models, temporary caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32), fmt: str | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """3 classes x 5 images, JPEG and PNG mixed, generated on the spot."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(5):
            write_image(root / name / f"{i}.{'jpg' if i % 2 else 'png'}", seed=10 * c + i)
    return root


@pytest.fixture
def cache_path(tmp_path: Path) -> str:
    return str(tmp_path / "features.zarr")


@pytest.fixture
def run_cli(capsys):
    """Run ``backbench ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from backbench.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
