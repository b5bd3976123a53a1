"""cifar10-mini: the 1,500 real CIFAR-10 photos shipped for the demo and the tests: splits,
balance, the shifted split, the licence beside the data, a byte-equal rebuild from the source
tarball (where it is on disk), and the lesson the demo exists to teach (pretrained features beat
a random-init network on real photos)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

import backbench
from backbench.errors import DataSourceError
from backbench.extract.datasets import Cifar10Mini, open_source

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TARBALL = Path(os.environ.get("BACKBENCH_CIFAR10_TARBALL", ROOT.parent / "shared/data/cifar10-train.tar.gz"))


def test_splits_are_balanced_disjoint_and_interleaved():
    train, test, shifted = (open_source("cifar10-mini", s) for s in ("train", "test", "shifted"))
    assert (len(train), len(test), len(shifted)) == (1000, 500, 500)
    assert train.classes == test.classes == CLASSES
    assert np.bincount(train.labels).tolist() == [100] * 10 and np.bincount(test.labels).tolist() == [50] * 10
    assert not set(train.ids) & set(test.ids) and len(set(train.ids)) == 1000
    # class by class in turn: any first 10*k rows hold k images of every class (a battle's `limit`)
    assert train.labels[:30].tolist() == list(range(10)) * 3
    assert all(CLASSES[label] == sample.split("/")[0] for sample, label in zip(train.ids, train.labels))
    img = train.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_shifted_is_the_test_split_corrupted_reproducibly():
    test, shifted = open_source("cifar10-mini", "test"), open_source("cifar10-mini", "shifted")
    assert shifted.ids == test.ids and shifted.labels.tolist() == test.labels.tolist()
    clean, bent = np.asarray(test.load(5), dtype=float), np.asarray(shifted.load(5), dtype=float)
    assert bent.std() < clean.std() + 30 and np.abs(bent - clean).mean() > 10
    assert np.array_equal(np.asarray(open_source("cifar10-mini", "shifted").load(5)), bent)
    assert shifted.fingerprint() != test.fingerprint() == open_source("cifar10-mini", "test").fingerprint()


def test_unknown_split_names_the_ones_there_are():
    with pytest.raises(DataSourceError, match="train, test, shifted"):
        Cifar10Mini("val")


def test_source_and_licence_ship_beside_the_data():
    data = files("backbench.extract.datasets").joinpath("data")
    text = data.joinpath("CIFAR10-MINI.md").read_text()
    assert "Krizhevsky" in text and "Licence" in text and "cs.toronto.edu/~kriz/cifar.html" in text
    assert data.joinpath("cifar10-mini.zip").is_file()


@pytest.mark.skipif(not TARBALL.is_file(), reason=f"the CIFAR-10 JPEG tarball is not at {TARBALL}")
def test_rebuild_from_the_source_tarball_is_byte_equal(tmp_path):
    shipped = ROOT / "backbench/extract/datasets/data/cifar10-mini.zip"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    copy = tmp_path / "tools"
    copy.mkdir()
    script = (ROOT / "tools/make_cifar10_mini.py").read_text().replace(
        'Path(__file__).resolve().parents[1] / "backbench/extract/datasets/data/cifar10-mini.zip"',
        f'Path({str(tmp_path / "rebuilt.zip")!r})')
    (copy / "make.py").write_text(script)
    subprocess.run([sys.executable, str(copy / "make.py"), str(TARBALL)], check=True, capture_output=True, timeout=300)
    assert hashlib.sha256((tmp_path / "rebuilt.zip").read_bytes()).hexdigest() == before


def test_pretrained_features_beat_random_init_on_the_real_photos(tmp_path):
    """The demo's lesson, on 200 training and 100 test photos: ImageNet weights win."""
    cache = tmp_path / "c.zarr"
    top1 = {}
    for weights in ("local", "random"):
        name = f"timm:tf_efficientnet_lite0@{weights}"
        for split, limit in (("train", 200), ("test", 100)):
            backbench.extract(name, "cifar10-mini", dataset="cifar10-mini", split=split, cache=cache, limit=limit,
                              workers=0)
        top1[weights] = backbench.probe(name, "cifar10-mini", train="train", eval="test", cache=cache,
                                        C=[0.1, 1.0]).metrics["top1"]
    assert top1["local"] > 0.5 and top1["local"] > top1["random"] + 0.2, top1
