"""More data sources: torchvision:NAME:ROOT, hf-dataset:NAME[:CONFIG], wds:PATTERN (all offline)."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import DataSourceError
from backbench.extract.data import ImageFolder, _expand_braces, open_source

RESNET = "timm:test_resnet@random"


def rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# --- torchvision ---------------------------------------------------------------------------


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


# --- hf-dataset ----------------------------------------------------------------------------


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


# --- wds -----------------------------------------------------------------------------------


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(imagefolder: Path, out: Path, per_shard: int = 8) -> list[str]:
    """The imagefolder's images in its own order as shards of ``per_shard`` samples."""
    ref = ImageFolder(imagefolder)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(ref), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:06d}.tar", "w") as tf:
            for i in range(s, min(s + per_shard, len(ref))):
                ext = Path(ref.ids[i]).suffix[1:]
                add(tf, f"{i:06d}.{ext}", (imagefolder / ref.ids[i]).read_bytes())
                add(tf, f"{i:06d}.cls", f"{ref.labels[i]}\n".encode())
    (out / "classes.txt").write_text("\n".join(ref.classes) + "\n")
    return ref.ids


def test_wds_index_ids_labels_and_bytes(tmp_path, imagefolder):
    write_shards(imagefolder, tmp_path / "w")
    ref = ImageFolder(imagefolder)
    src = open_source(f"wds:{tmp_path}/w/shard-{{000000..000001}}.tar", "train")
    assert len(src) == 15 and src.ids[0] == "shard-000000.tar/000000" and src.ids[8] == "shard-000001.tar/000008"
    assert src.labels.tolist() == ref.labels.tolist() and src.classes == ["cat", "dog", "eel"]
    for i in (0, 7, 8, 14):
        assert src.read_bytes(i) == (imagefolder / ref.ids[i]).read_bytes()
        assert np.array_equal(rgb(src.load(i)), rgb(ref.load(i)))
    assert src.has_bytes
    assert open_source(f"wds:{tmp_path}/w/*.tar", "x").ids == src.ids
    assert open_source(f"wds:{tmp_path}/w", "x").fingerprint() == src.fingerprint()
    copy = pickle.loads(pickle.dumps(src))
    assert copy.read_bytes(9) == src.read_bytes(9)
    before = src.fingerprint()
    with tarfile.open(tmp_path / "w" / "shard-000001.tar", "a") as tf:  # same samples, another shard size
        add(tf, "__meta__.txt", b"x" * 30000)
    changed = open_source(f"wds:{tmp_path}/w/*.tar", "x")
    assert changed.ids == src.ids and changed.fingerprint() != before


def test_wds_json_labels_without_class_file(tmp_path, imagefolder):
    jpg = (imagefolder / "dog" / "1.jpg").read_bytes()
    (tmp_path / "j").mkdir()
    with tarfile.open(tmp_path / "j" / "a.tar", "w") as tf:
        for key, label in (("x/k1", "zebra"), ("x/k2", "ant"), ("x/k3", "zebra")):
            add(tf, f"{key}.jpeg", jpg)
            add(tf, f"{key}.json", json.dumps({"label": label, "w": 3}).encode())
    src = open_source(f"wds:{tmp_path}/j/a.tar", "train")
    assert src.ids == ["a.tar/x/k1", "a.tar/x/k2", "a.tar/x/k3"]
    assert src.classes == ["ant", "zebra"] and src.labels.tolist() == [1, 0, 1]
    assert src.read_bytes(1) == jpg


def test_wds_errors(tmp_path, imagefolder):
    with pytest.raises(DataSourceError, match="no shards match"):
        open_source(f"wds:{tmp_path}/none-{{000..003}}.tar", "train")
    write_shards(imagefolder, tmp_path / "w")
    with pytest.raises(DataSourceError, match=r"1 shard\(s\) .* do not exist.*shard-000002.tar"):
        open_source(f"wds:{tmp_path}/w/shard-{{000000..000002}}.tar", "train")
    (tmp_path / "bad").mkdir()
    with tarfile.open(tmp_path / "bad" / "s.tar", "w") as tf:
        add(tf, "a.png", (imagefolder / "cat" / "0.png").read_bytes())
        add(tf, "a.cls", b"0")
        add(tf, "b.png", (imagefolder / "cat" / "2.png").read_bytes())
        add(tf, "b.txt", b"a caption")
    with pytest.raises(DataSourceError, match=r"shard s.tar: sample 'b' has no label"):
        open_source(f"wds:{tmp_path}/bad/s.tar", "train")
    import gzip

    (tmp_path / "gz.tar").write_bytes(gzip.compress((tmp_path / "w" / "shard-000000.tar").read_bytes()))
    with pytest.raises(DataSourceError, match="is compressed"):
        open_source(f"wds:{tmp_path}/gz.tar", "train")


def test_brace_expansion():
    assert _expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert _expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert _expand_braces("plain.tar") == ["plain.tar"]


def test_wds_extraction_equals_imagefolder(tmp_path, imagefolder):
    from backbench.extract.run import extract
    from backbench.store import Cache

    write_shards(imagefolder, tmp_path / "w")
    a = extract(RESNET, f"wds:{tmp_path}/w/shard-{{000000..000001}}.tar", cache=str(tmp_path / "c.zarr"),
                dataset="w", split="train", workers=0)
    b = extract(RESNET, f"imagefolder:{imagefolder}", cache=str(tmp_path / "c.zarr"),
                dataset="f", split="train", workers=0)
    assert a.status == b.status == "extracted" and a.n == 15
    cache = Cache(str(tmp_path / "c.zarr"))
    gw, gf = cache.group(RESNET, "w", "train"), cache.group(RESNET, "f", "train")
    assert np.array_equal(gw.features(), gf.features()) and np.array_equal(gw.labels(), gf.labels())
    assert gw.attrs["classes"] == ["cat", "dog", "eel"] and gw.ids()[0] == "shard-000000.tar/000000"
