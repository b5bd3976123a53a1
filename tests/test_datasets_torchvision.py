"""torchvision:NAME:ROOT data sources, read offline from files written here."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import DataSourceError
from backbench.extract.datasets import open_source

RESNET = "timm:test_resnet@random"


def rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def write_mnist(root: Path, n_train: int = 6, n_test: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's raw idx files as torchvision reads them (it checks only that they exist)."""
    raw, out, rng = root / "MNIST" / "raw", {}, np.random.default_rng(0)
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        header = np.asarray([2051, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.asarray([2049, n], dtype=">i4").tobytes() + labels.tobytes())
        out["train" if prefix == "train" else "test"] = (images, labels)
    return out


def test_torchvision_mnist_raw_files(tmp_path):
    written = write_mnist(tmp_path)
    for split in ("train", "test"):
        src = open_source(f"torchvision:MNIST:{tmp_path}", split)
        images, labels = written[split]
        assert src.ids == [f"{split}/{i}" for i in range(len(labels))]
        assert src.labels.dtype == np.int64 and src.labels.tolist() == labels.tolist()
        assert src.classes[0] == "0 - zero" and len(src.classes) == 10
        img = src.load(1)
        assert img.mode == "RGB" and img.size == (28, 28)
        assert np.array_equal(rgb(img), np.repeat(images[1][..., None], 3, axis=2))
    assert open_source(f"torchvision:mnist:{tmp_path}", "train").spec.startswith("torchvision:MNIST:")
    with pytest.raises(DataSourceError, match="splits train, test; not 'val'"):
        open_source(f"torchvision:MNIST:{tmp_path}", "val")


def test_torchvision_cifar10_pickles(tmp_path, monkeypatch):
    """A fake cifar-10-batches-py; torchvision's md5 check is replaced by an existence check."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    folder, rng, batches = tmp_path / "cifar-10-batches-py", np.random.default_rng(1), {}
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        batches[name] = (data, rng.integers(0, 10, size=2).tolist())
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": batches[name][1]}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    train = open_source(f"torchvision:CIFAR10:{tmp_path}", "train")
    test = open_source(f"torchvision:CIFAR10:{tmp_path}", "test")
    assert len(train) == 10 and len(test) == 2 and train.classes == names
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert test.ids == ["test/0", "test/1"] and test.labels.tolist() == batches["test_batch"][1]
    expected = batches["data_batch_2"][0][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(rgb(train.load(3)), expected)
    assert train.fingerprint() != test.fingerprint()


def test_torchvision_missing_root_suggests_download(tmp_path):
    with pytest.raises(DataSourceError) as err:
        open_source(f"torchvision:CIFAR10:{tmp_path / 'none'}", "train")
    message = str(err.value)
    assert "\n" not in message and "cifar-10-batches-py" in message and "--download" in message


class TinySplit:
    """A ``split=`` dataset with CHW float tensors and ``_labels`` (as Food101/DTD keep them)."""

    made: list[bool] = []

    def __init__(self, root: str, split: str = "train", transform=None, download: bool = False) -> None:
        import torch
        from torchvision.datasets.utils import verify_str_arg

        verify_str_arg(split, "split", ("train", "val"))
        TinySplit.made.append(download)
        if not download and not os.path.isdir(root):
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self._labels = [2, 0, 1, 2] if split == "train" else [1]
        g = torch.Generator().manual_seed(len(self._labels))
        self.images = [torch.rand(3, 12, 10, generator=g) for _ in self._labels]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i):
        return self.images[i], self._labels[i]


@pytest.fixture
def tiny_split(monkeypatch):
    import torchvision.datasets

    TinySplit.made = []
    monkeypatch.setattr(torchvision.datasets, "TinySplit", TinySplit, raising=False)
    return TinySplit


def test_torchvision_split_datasets_tensors_and_download(tmp_path, tiny_split):
    src = open_source(f"torchvision:TinySplit:{tmp_path}", "train")
    assert src.labels.tolist() == [2, 0, 1, 2] and src.classes == ["0", "1", "2"]
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (10, 12)
    expected = (src._ds.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(rgb(img), expected)
    with pytest.raises(DataSourceError, match=r"TinySplit has splits 'train', 'val'; not 'test'"):
        open_source(f"torchvision:TinySplit:{tmp_path}", "test")
    with pytest.raises(DataSourceError, match="pass --download"):
        open_source(f"torchvision:TinySplit:{tmp_path / 'none'}", "val")
    assert open_source(f"torchvision:TinySplit:{tmp_path / 'none'}", "val", download=True).labels.tolist() == [1]
    assert tiny_split.made[-1] is True and open_source("digits", "train", download=True).classes[0] == "0"


def test_torchvision_spec_errors():
    with pytest.raises(DataSourceError, match="needs NAME:ROOT"):
        open_source("torchvision:CIFAR10", "train")
    with pytest.raises(DataSourceError, match="no dataset 'CIFAR11'"):
        open_source("torchvision:CIFAR11:/x", "train")
    with pytest.raises(DataSourceError, match=r"torchvision:NAME:ROOT, hf-dataset:NAME\[:CONFIG\], wds:PATTERN"):
        open_source("nope:/x", "train")


def test_cli_download_flag_reaches_torchvision(tmp_path, tiny_split, run_cli):
    code, out, err = run_cli("extract", RESNET, "--data", f"torchvision:TinySplit:{tmp_path / 'none'}",
                             "--dataset", "t", "--split", "train", "--cache", str(tmp_path / "c.zarr"),
                             "--workers", "0", "--download")
    assert code == 0, err
    assert tiny_split.made == [True] and "extracted 4 rows" in out
    code, _, err = run_cli("extract", RESNET, "--data", f"torchvision:TinySplit:{tmp_path / 'none'}",
                           "--dataset", "t", "--split", "val", "--cache", str(tmp_path / "c.zarr"))
    assert code != 0 and "--download" in err
