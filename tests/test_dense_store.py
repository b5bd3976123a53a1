"""Dense labels in the cache (masks at full resolution, boxes, image sizes): written once by
extraction, read back exactly, and refused when torn or edited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from backbench.errors import CacheMismatch, DamagedGroup, DataSourceError, GroupNotFound
from backbench.extract.datasets import ImageSource, open_source
from backbench.extract.run import extract
from backbench.store import Cache
from backbench.store.dense import dense_path, read_dense_labels, write_dense_labels

CNN = "timm:test_resnet@random"


class Ragged(ImageSource):
    """Images of different sizes with masks (some pixels unlabelled) and 0..2 boxes each."""

    ignore_index = 255

    def __init__(self, n: int = 5, seed: int = 0, dense: frozenset[str] = frozenset({"mask", "boxes"})) -> None:
        self.spec, self.seed, self.dense = "ragged:test", seed, dense
        self.classes = ["sky", "road", "car"]
        self.ids = [f"im{i}" for i in range(n)]
        self.labels = np.zeros(n, dtype=np.int64)

    def image_size(self, index: int) -> tuple[int, int]:
        return 5 + index, 7 + 3 * index

    def load(self, index: int):
        from PIL import Image

        h, w = self.image_size(index)
        return Image.fromarray(np.full((h, w, 3), 40 * index, dtype=np.uint8))

    def mask(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed * 100 + index)
        m = rng.integers(0, 3, self.image_size(index))
        m[0, :2] = 255
        return m

    def boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        k = index % 3
        xy = np.arange(4 * k, dtype=np.float32).reshape(k, 4) + index + 0.5
        return xy, np.arange(k, dtype=np.int64) % 3

    def _fingerprint_extra(self) -> Any:
        return self.seed


def test_ragged_masks_boxes_and_sizes_round_trip(cache_path):
    src, cache = Ragged(), Cache(cache_path)
    write_dense_labels(cache, "r", "val", src)
    labels = read_dense_labels(Cache(cache_path, mode="r"), "r", "val")
    assert labels.classes == src.classes and labels.ignore_index == 255 and labels.ids == src.ids
    assert labels.dense == {"mask", "boxes"} and labels.fingerprint == src.fingerprint() and len(labels) == 5
    np.testing.assert_array_equal(labels.image_sizes, [src.image_size(i) for i in range(5)])
    for i in range(5):
        got = labels.mask(i)
        assert got.dtype == np.int64 and got.shape == src.image_size(i)
        np.testing.assert_array_equal(got, src.mask(i))
        boxes, classes = labels.boxes(i)
        assert boxes.dtype == np.float32 and boxes.shape == (i % 3, 4) and classes.dtype == np.int64
        np.testing.assert_array_equal(boxes, src.boxes(i)[0])
        np.testing.assert_array_equal(classes, src.boxes(i)[1])
    group = zarr.open_group(cache_path, mode="r")[dense_path("r", "val")]  # plain zarr reads it too
    assert group["mask_values"].dtype == np.uint8 and group.attrs["backbench_kind"] == "dense_labels"
    assert group["mask_offsets"][-1] == sum(h * w for h, w in labels.image_sizes)


def test_a_source_with_boxes_only_has_no_masks(cache_path):
    write_dense_labels(Cache(cache_path), "r", "val", Ragged(dense=frozenset({"boxes"})))
    labels = read_dense_labels(Cache(cache_path, mode="r"), "r", "val")
    assert labels.boxes(1)[0].shape == (1, 4)
    with pytest.raises(GroupNotFound, match="have no mask \\(the source gave boxes\\)"):
        labels.mask(0)
    with pytest.raises(DataSourceError, match="no dense labels"):
        write_dense_labels(Cache(cache_path), "r", "x", Ragged(dense=frozenset()))


def test_written_once_other_sources_refused_unless_overwrite(cache_path):
    cache = Cache(cache_path)
    write_dense_labels(cache, "r", "val", Ragged())
    meta = Path(cache_path) / dense_path("r", "val") / "zarr.json"
    before = meta.stat().st_mtime_ns
    write_dense_labels(cache, "r", "val", Ragged())  # the same source: kept as it is
    assert meta.stat().st_mtime_ns == before
    with pytest.raises(CacheMismatch, match="dense labels of another source .*--overwrite"):
        write_dense_labels(cache, "r", "val", Ragged(seed=1))
    write_dense_labels(cache, "r", "val", Ragged(seed=1), overwrite=True)
    np.testing.assert_array_equal(read_dense_labels(cache, "r", "val").mask(2), Ragged(seed=1).mask(2))
    with pytest.raises(GroupNotFound, match="no dense labels of r/test"):
        read_dense_labels(cache, "r", "test")


def _attrs(cache_path: str, **changes) -> None:
    meta = Path(cache_path) / dense_path("r", "val") / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(changes)
    doc["attributes"] = {k: v for k, v in doc["attributes"].items() if v is not None}
    meta.write_text(json.dumps(doc))


def test_torn_labels_are_refused_and_written_again(cache_path):
    cache = Cache(cache_path)
    write_dense_labels(cache, "r", "val", Ragged())
    _attrs(cache_path, sha256=None)  # as a crash leaves them: arrays without their hashes
    with pytest.raises(DamagedGroup, match="dense labels _dense/r/val are damaged: it was never finished"):
        read_dense_labels(cache, "r", "val")
    write_dense_labels(cache, "r", "val", Ragged())
    np.testing.assert_array_equal(read_dense_labels(cache, "r", "val").mask(4), Ragged().mask(4))


def test_edited_labels_are_refused(cache_path):
    cache = Cache(cache_path)
    write_dense_labels(cache, "r", "val", Ragged())
    _attrs(cache_path, ignore_index=0)
    with pytest.raises(DamagedGroup, match="attributes .* fail their SHA-256"):
        read_dense_labels(cache, "r", "val")
    write_dense_labels(cache, "r", "val", Ragged(), overwrite=True)  # checked whole, written again
    root = Path(cache_path) / dense_path("r", "val")
    chunk = next((root / "box_labels").rglob("c/*"))
    chunk.write_bytes(bytes(b ^ 1 for b in chunk.read_bytes()))
    labels = read_dense_labels(cache, "r", "val")
    np.testing.assert_array_equal(labels.mask(1), Ragged().mask(1))  # masks are intact
    with pytest.raises(DamagedGroup, match="box_labels fails its SHA-256 .*--overwrite"):
        labels.boxes(1)
    write_dense_labels(cache, "r", "val", Ragged(), overwrite=True)
    for f in (root / "mask_values").rglob("c/*"):
        f.unlink()
    with pytest.raises(DamagedGroup, match="mask_values fails its SHA-256"):
        read_dense_labels(cache, "r", "val").mask(0)


def test_masks_that_do_not_fit_their_image_are_refused(cache_path):
    class Bad(Ragged):
        def mask(self, index: int) -> np.ndarray:
            return np.full((2, 2), 7) if index == 3 else super().mask(index)

    with pytest.raises(DataSourceError, match="mask of sample 'im3' is int64 of shape \\(2, 2\\)"):
        write_dense_labels(Cache(cache_path), "r", "val", Bad())

    class Outside(Ragged):
        def mask(self, index: int) -> np.ndarray:
            m = super().mask(index)
            m[-1, -1] = 9
            return m

    with pytest.raises(DataSourceError, match="holds 9, not a class \\(0..2\\) or the ignore index 255"):
        write_dense_labels(Cache(cache_path), "r", "val", Outside())


def test_extraction_writes_the_dense_labels_of_shapes_once(cache_path):
    src = open_source("shapes", "val")
    res = extract(CNN, src, cache=cache_path, dataset="shapes", split="val", limit=8, workers=0, batch_size=4,
                  features=["map"], map_grid=(2, 2))
    assert res.dense_labels == "_dense/shapes/val"
    cache = Cache(cache_path, mode="r")
    labels = read_dense_labels(cache, "shapes", "val")
    assert len(labels) == 8 and labels.classes == src.classes and labels.ids == src.ids[:8]
    assert labels.fingerprint == cache.group(CNN, "shapes", "val", "map").attrs["dataset_fingerprint"]
    for i in range(8):
        np.testing.assert_array_equal(labels.mask(i), src.mask(i))
        np.testing.assert_array_equal(labels.boxes(i)[0], src.boxes(i)[0])
        np.testing.assert_array_equal(labels.boxes(i)[1], src.boxes(i)[1])
    np.testing.assert_array_equal(labels.image_sizes, np.full((8, 2), 64))
    meta = Path(cache_path) / "_dense/shapes/val/zarr.json"
    before = meta.stat().st_mtime_ns
    extract(CNN, src, cache=cache_path, dataset="shapes", split="val", limit=8, workers=0, batch_size=4)  # pooled
    assert meta.stat().st_mtime_ns == before  # written once per (dataset, split), whatever the kind
    assert [g.path for g in Cache(cache_path, mode="r").groups()] == [  # not a feature group
        "timm~test_resnet@random/shapes/val", "timm~test_resnet@random/shapes/val~map"]


def test_two_writers_at_once_write_the_labels_once(cache_path):
    """Two extractions of one split (different backbones) write its labels under the group's own lock."""
    from concurrent.futures import ThreadPoolExecutor

    Cache(cache_path)  # the cache exists, so its lock folders can be made
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: write_dense_labels(Cache(cache_path), "r", "val", Ragged(n=40)), range(2)))
    labels = read_dense_labels(Cache(cache_path, mode="r"), "r", "val").verify()
    np.testing.assert_array_equal(labels.mask(39), Ragged(n=40).mask(39))


def test_refused_dense_labels_leave_no_empty_feature_group(tmp_path):
    """Labels of shapes/test written from 20 images; extracting 30 into the same (dataset, split)
    is refused in one line, and no empty feature group is left behind to be misread later."""
    import backbench
    from backbench.errors import CacheMismatch

    path = str(tmp_path / "c.zarr")
    backbench.extract("timm:test_resnet@random", "shapes", dataset="shapes", split="test", cache=path, limit=20,
                      workers=0)
    with pytest.raises(CacheMismatch, match="dense labels of another source"):
        backbench.extract("timm:test_efficientnet@random", "shapes", dataset="shapes", split="test", cache=path,
                          limit=30, workers=0)
    assert [g.attrs["backbone"] for g in Cache(path).groups()] == ["timm:test_resnet@random"]
