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


def put_group(cache_path: str, backbone: str, dataset: str, split: str, X: np.ndarray, y: np.ndarray,
              classes: list[str] | None = None, *, chunk_rows: int = 256, logits: np.ndarray | None = None,
              dtype: str = "float32", **attrs) -> None:
    """Write features straight into a real cache group, as extraction would (no model needed)."""
    from backbench.store import Cache

    classes = classes or [str(c) for c in range(int(y.max()) + 1)]
    meta = {"backbench_kind": "features", "backbone": backbone, "weights_sha256": "w" * 64,
            "preprocess": {"input_size": [3, 8, 8]}, "feature_kind": "pooled", "dataset": dataset, "split": split,
            "source": "test", "dataset_fingerprint": f"{dataset}-{split}-{len(y)}", "classes": classes,
            "dtype": dtype, **attrs}
    group = Cache(cache_path).create_group(backbone, dataset, split, n=len(y), dim=X.shape[1],
                                           num_classes=0 if logits is None else logits.shape[1], dtype=dtype,
                                           chunk_rows=chunk_rows, attrs=meta)
    for c in range(group.n_chunks):
        a, b = group.chunk_bounds(c)
        group.write_chunk(c, X[a:b], y[a:b], [f"{split}/{i}" for i in range(a, b)],
                          None if logits is None else logits[a:b])
    group.finalize()


def digits_pixels() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's digits as noisy float32 pixels, with fixed train/val/test row indices."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) + np.random.default_rng(0).normal(0, 0.5, X.shape).astype(np.float32)
    idx = np.random.default_rng(1).permutation(len(y))
    return X, y, {"train": idx[:1000], "val": idx[1000:1300], "test": idx[1300:]}


@pytest.fixture
def digits_cache(cache_path) -> str:
    """Pixel features of scikit-learn's digits as a cache: train/val/test splits of 'digits'."""
    X, y, parts = digits_pixels()
    for split, rows in parts.items():
        put_group(cache_path, "fake:pixels", "digits", split, X[rows], y[rows])
    return cache_path
