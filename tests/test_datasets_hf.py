"""hf-dataset:NAME[:CONFIG] data sources: saved datasets, column options, local folders (offline)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from backbench.errors import DataSourceError
from backbench.extract.datasets import ImageFolder, open_source


def rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    yield datasets
    datasets.enable_progress_bars()


def pil(seed: int, size=(20, 16)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_hf_dataset_saved_dict(tmp_path, hf_offline):
    d = hf_offline
    features = d.Features({"image": d.Image(), "label": d.ClassLabel(names=["ant", "bee", "cow"])})
    train = d.Dataset.from_dict({"image": [pil(i) for i in range(5)], "label": [2, 0, 1, 2, 0]}, features=features)
    test = d.Dataset.from_dict({"image": [pil(9)], "label": [1]}, features=features)
    d.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "saved"))

    src = open_source(f"hf-dataset:{tmp_path / 'saved'}", "train")
    assert src.classes == ["ant", "bee", "cow"] and src.labels.tolist() == [2, 0, 1, 2, 0]
    assert src.ids == [f"train/{i}" for i in range(5)] and src.has_bytes
    assert np.array_equal(rgb(src.load(3)), rgb(pil(3)))
    assert src.read_bytes(3)[:4] == b"\x89PNG"
    again = pickle.loads(pickle.dumps(src))
    assert np.array_equal(rgb(again.load(1)), rgb(pil(1))) and again.fingerprint() == src.fingerprint()
    assert open_source(f"hf-dataset:{tmp_path / 'saved'}", "test").labels.tolist() == [1]
    with pytest.raises(DataSourceError, match="has splits train, test; not 'val'"):
        open_source(f"hf-dataset:{tmp_path / 'saved'}", "val")
    with pytest.raises(DataSourceError, match="no configs"):
        open_source(f"hf-dataset:{tmp_path / 'saved'}:cfg", "train")


def test_hf_dataset_column_overrides_and_ids(tmp_path, hf_offline):
    d = hf_offline
    features = d.Features({"a": d.Image(), "b": d.Image(), "kind": d.Value("string"), "file_name": d.Value("string")})
    ds = d.Dataset.from_dict({"a": [pil(i) for i in range(3)], "b": [pil(10 + i) for i in range(3)],
                              "kind": ["dog", "cat", "dog"], "file_name": ["x.png", "y.png", "z.png"]},
                             features=features)
    ds.save_to_disk(str(tmp_path / "one"))  # a single Dataset: one set, whatever the split is called

    with pytest.raises(DataSourceError, match=r"several image columns \(a, b\).*\?image=COL"):
        open_source(f"hf-dataset:{tmp_path / 'one'}", "train")
    with pytest.raises(DataSourceError, match=r"no ClassLabel columns.*\?label=COL"):
        open_source(f"hf-dataset:{tmp_path / 'one'}?image=b", "train")
    src = open_source(f"hf-dataset:{tmp_path / 'one'}?image=b&label=kind", "train")
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [1, 0, 1]
    assert src.ids == ["x.png", "y.png", "z.png"]
    assert np.array_equal(rgb(src.load(2)), rgb(pil(12)))
    assert src.fingerprint() != open_source(f"hf-dataset:{tmp_path / 'one'}?image=a&label=kind", "train").fingerprint()
    with pytest.raises(DataSourceError, match="no column 'nope'"):
        open_source(f"hf-dataset:{tmp_path / 'one'}?image=nope&label=kind", "train")
    with pytest.raises(DataSourceError, match="unknown option 'labels'"):
        open_source(f"hf-dataset:{tmp_path / 'one'}?labels=kind", "train")


def test_hf_dataset_local_imagefolder(tmp_path, hf_offline, imagefolder):
    src = open_source(f"hf-dataset:{imagefolder}", "train")
    ref = ImageFolder(imagefolder)
    assert src.classes == ref.classes and sorted(src.labels.tolist()) == sorted(ref.labels.tolist())
    with pytest.raises(DataSourceError, match="local path .* does not exist"):
        open_source(f"hf-dataset:{tmp_path / 'nope'}", "train")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataSourceError, match="cannot load local path"):
        open_source(f"hf-dataset:{tmp_path / 'broken.parquet'}", "train")
