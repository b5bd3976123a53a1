"""Feature maps (kinds ``map`` and ``layer-N:map``): against timm's own forward on the whole
image resized with torchvision, through extraction, the cache (``map_shape``, resume, damage)
and :class:`~backbench.probe.maps.MapArray`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from backbench.errors import BackbenchError, DamagedGroup
from backbench.extract.backbones import load_backbone
from backbench.extract.datasets import open_source
from backbench.extract.run import extract
from backbench.kinds import expand, parse_kind
from backbench.probe.maps import MapArray, open_maps
from backbench.store import Cache

VIT, CNN = "timm:test_vit@random", "timm:test_resnet@random"
N = 12


def _reference(model, source, n: int = N) -> torch.Tensor:
    """timm's ``forward_features`` of the first ``n`` images, each resized whole (no crop) to the
    model's input with torchvision, normalized with timm's data config: NCHW or tokens."""
    import timm
    from torchvision.transforms import v2

    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"][1:])
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, interpolation=v2.InterpolationMode(cfg["interpolation"]),
                                                 antialias=True)])
    x = torch.stack([tf(source.load(i)) for i in range(n)]).float() / 255.0
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model.forward_features(x)


def _close(got: np.ndarray, want: torch.Tensor) -> None:
    np.testing.assert_allclose(got, want.numpy(), atol=3e-3, rtol=3e-3)  # stored as float16


@pytest.fixture(scope="module")
def photos():
    return open_source("cifar10-mini", "train")


def test_vit_map_is_timms_patch_tokens_in_their_grid(tmp_path, photos):
    cache = str(tmp_path / "c.zarr")
    extract(VIT, photos, cache=cache, dataset="c", split="train", limit=N, workers=0, batch_size=4,
            features=["map"])
    group = Cache(cache, mode="r").group(VIT, "c", "train", "map")
    model = load_backbone(VIT).model
    tokens = _reference(model, photos)
    want = tokens[:, model.num_prefix_tokens:].reshape(N, 10, 10, -1)  # 160 px / 16 px patches
    assert group.attrs["map_shape"] == [10, 10, 64] and group.dim == 10 * 10 * 64
    assert group.path.endswith("/c/train~map") and group.attrs["preprocess"]["resize"] == "full"
    maps = MapArray(group)
    assert maps.shape == (N, 10, 10, 64) and len(maps) == N and maps.input_size == (160, 160)
    _close(maps[:], want)
    # the stored bytes are the row-major (n, h, w, d) array, as plain zarr sees them
    raw = zarr.open_group(cache, mode="r")[group.path]["features"][:]
    np.testing.assert_array_equal(raw.reshape(N, 10, 10, 64), maps[:].astype(np.float16))


def test_cnn_map_is_forward_features_channels_last_and_grid_pools_it(tmp_path, photos):
    cache = str(tmp_path / "c.zarr")
    extract(CNN, photos, cache=cache, dataset="c", split="train", limit=N, workers=0, batch_size=4,
            features=["map"])
    extract(CNN, photos, cache=cache, dataset="g", split="train", limit=N, workers=0, batch_size=4,
            features=["map"], map_grid=(3, 2))
    fmap = _reference(load_backbone(CNN).model, photos)  # (N, 96, 5, 5)
    store = Cache(cache, mode="r")
    _close(MapArray(store.group(CNN, "c", "train", "map"))[:], fmap.permute(0, 2, 3, 1))
    pooled = store.group(CNN, "g", "train", "map")
    assert pooled.attrs["map_shape"] == [3, 2, 96] and pooled.attrs["preprocess"]["map_grid"] == [3, 2]
    want = torch.nn.functional.adaptive_avg_pool2d(fmap, (3, 2)).permute(0, 2, 3, 1)
    _close(open_maps(store, CNN, "g", "train")[:], want)


def test_vit_map_grid_and_an_earlier_block(tmp_path, photos):
    cache = str(tmp_path / "c.zarr")
    extract(VIT, photos, cache=cache, dataset="c", split="train", limit=N, workers=0, batch_size=4,
            features=["map"], layers=[-2], map_grid=(4, 4))
    model = load_backbone(VIT).model
    tokens = _reference(model, photos)[:, model.num_prefix_tokens:]
    grid = tokens.reshape(N, 10, 10, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.adaptive_avg_pool2d(grid, (4, 4)).permute(0, 2, 3, 1)
    store = Cache(cache, mode="r")
    _close(open_maps(store, VIT, "c", "train")[:], want)
    layer2 = open_maps(store, VIT, "c", "train", "layer-2:map")
    assert layer2.shape == (N, 4, 4, 64) and layer2.group.path.endswith("train~layer-2.map")


def test_map_grid_larger_than_the_map_and_mixed_kinds_are_refused(tmp_path, photos):
    cache = str(tmp_path / "c.zarr")
    with pytest.raises(BackbenchError, match="larger than .*5x5 map"):
        extract(CNN, photos, cache=cache, dataset="c", split="train", limit=4, workers=0, features=["map"],
                map_grid=(6, 5))
    with pytest.raises(BackbenchError, match="extract them in two runs"):
        extract(CNN, photos, cache=cache, dataset="c", split="train", limit=4, workers=0,
                features=["map", "mean-patch"])
    with pytest.raises(BackbenchError, match="--map-grid pools feature maps"):
        extract(CNN, photos, cache=cache, dataset="c", split="train", limit=4, workers=0, map_grid=(2, 2))
    with pytest.raises(BackbenchError, match="center view only"):
        extract(CNN, photos, cache=cache, dataset="c", split="train", limit=4, workers=0, features=["map"],
                views="flip")
    assert parse_kind("layer-3:map") == (3, "map")
    assert expand(["map"], [-1, -3]) == ["map", "layer-1:map", "layer-3:map"]
    with pytest.raises(BackbenchError, match="center view only"):
        parse_kind("map@flip")


def test_resumed_map_extraction_equals_an_uninterrupted_one(tmp_path, photos):
    killed, clean = str(tmp_path / "k.zarr"), str(tmp_path / "c.zarr")
    opts = dict(dataset="c", split="train", limit=N, workers=0, batch_size=2, chunk_rows=4, features=["map"],
                map_grid=(2, 2))

    def stop(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(CNN, photos, cache=killed, progress=stop, **opts)
    partial = Cache(killed, mode="r").group(CNN, "c", "train", "map")
    done = partial.rows_done()
    assert 0 < done < N
    assert extract(CNN, photos, cache=killed, **opts).rows_written == N - done
    extract(CNN, photos, cache=clean, **opts)
    path = partial.path
    a, b = zarr.open_group(killed, mode="r")[path], zarr.open_group(clean, mode="r")[path]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["map_shape"] == b.attrs["map_shape"] and a.attrs["cache_key"] == b.attrs["cache_key"]


@pytest.fixture
def map_cache(tmp_path, photos) -> tuple[str, str]:
    cache = str(tmp_path / "c.zarr")
    extract(CNN, photos, cache=cache, dataset="c", split="train", limit=N, workers=0, batch_size=2, chunk_rows=4,
            features=["map"], map_grid=(2, 3))
    return cache, Cache(cache, mode="r").group(CNN, "c", "train", "map").path


def test_map_array_slices_equal_the_whole_array(map_cache):
    cache, _ = map_cache
    maps = open_maps(Cache(cache, mode="r"), CNN, "c", "train")
    whole = np.asarray(maps)
    assert whole.shape == (N, 2, 3, 96) and whole.dtype == np.float32
    for key in (slice(0, 3), slice(3, 9), slice(5, None), slice(None, None, 3), slice(-2, None)):
        np.testing.assert_array_equal(maps[key], whole[key])
    rows = np.array([11, 0, 5, 5, 7])
    np.testing.assert_array_equal(maps[rows], whole[rows])
    np.testing.assert_array_equal(maps[4], whole[4])
    assert maps[3:3].shape == (0, 2, 3, 96)


def _edit_attrs(cache: str, path: str, **changes) -> None:
    meta = Path(cache) / path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(changes)
    meta.write_text(json.dumps(doc))


def test_an_edited_map_shape_is_refused(map_cache):
    cache, path = map_cache
    _edit_attrs(cache, path, map_shape=[3, 2, 95])
    with pytest.raises(DamagedGroup, match="map_shape=\\[3, 2, 95\\] disagrees with dim=576"):
        Cache(cache, mode="r").group(CNN, "c", "train", "map")
    _edit_attrs(cache, path, map_shape=[2, 288])
    with pytest.raises(DamagedGroup, match="not \\[h, w, d\\]"):
        Cache(cache, mode="r").group(CNN, "c", "train", "map")
    _edit_attrs(cache, path, map_shape=None)
    with pytest.raises(DamagedGroup, match="lack 'map_shape'"):
        Cache(cache, mode="r").group(CNN, "c", "train", "map")


def test_a_map_chunk_missing_or_changed_is_refused(map_cache):
    cache, path = map_cache
    maps = open_maps(Cache(cache, mode="r"), CNN, "c", "train")
    np.testing.assert_array_equal(maps[0:4], maps[0:4])
    (Path(cache) / path / "features" / "c" / "1" / "0").unlink()  # rows 4:8
    maps = open_maps(Cache(cache, mode="r"), CNN, "c", "train")
    maps[0:4]  # chunks not touched still read
    with pytest.raises(DamagedGroup, match="file of chunk 1 \\(rows 4:8\\) of features is missing"):
        maps[3:5]
    chunk = Path(cache) / path / "features" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedGroup, match="chunk 2 fails its checksum"):
        open_maps(Cache(cache, mode="r"), CNN, "c", "train")[np.array([9])]


def test_cli_prints_the_size_it_will_write(run_cli, tmp_path):
    cache = str(tmp_path / "c.zarr")
    code, out, err = run_cli("extract", CNN, "--data", "textures", "--split", "train", "--limit", "8",
                             "--features", "map", "--map-grid", "4", "4", "--workers", "0", "--cache", cache)
    assert code == 0, err
    # 8 maps of 4 x 4 x 96 float16 = 24,576 bytes
    assert f"{CNN} textures/train: writing about 24.6 kB: 8 maps of 4x4x96 float16" in out
    code, out, err = run_cli("extract", CNN, "--data", "textures", "--split", "train", "--limit", "8",
                             "--features", "map", "--map-grid", "4", "4", "--workers", "0", "--cache", cache)
    assert code == 0 and "writing" not in out and "already complete" in out  # nothing left to write
    code, out, err = run_cli("extract", CNN, "--data", "textures", "--split", "train", "--limit", "8",
                             "--features", "map", "cls", "--workers", "0", "--cache", cache)
    assert code != 0 and "extract them in two runs" in err
