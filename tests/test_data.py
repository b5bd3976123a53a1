"""Data sources: imagefolder, csv, digits: ids, labels, class names, fingerprints, errors."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.errors import DataSourceError
from backbench.extract.datasets import CsvSource, Digits, ImageFolder, open_source
from conftest import write_image


def test_imagefolder_ids_labels_classes(imagefolder):
    src = ImageFolder(imagefolder)
    assert src.classes == ["cat", "dog", "eel"]
    assert len(src) == 15 and src.ids[0] == "cat/0.png" and src.ids[-1] == "eel/4.png"
    assert src.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    img = src.load(1)
    assert img.mode == "RGB" and img.size == (40, 32)


def test_fingerprint_changes_with_the_data(imagefolder):
    before = ImageFolder(imagefolder).fingerprint()
    assert ImageFolder(imagefolder).fingerprint() == before
    write_image(imagefolder / "cat" / "0.png", seed=99, size=(50, 50))
    assert ImageFolder(imagefolder).fingerprint() != before


def test_csv_relative_paths_and_labels(imagefolder):
    csv = imagefolder / "list.csv"
    csv.write_text("path,label\ncat/0.png,cat\ndog/1.jpg,dog\ncat/2.png,cat\n")
    src = CsvSource(csv)
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 1, 0]
    assert src.load(1).size == (40, 32)


def test_csv_numeric_labels_sort_as_numbers(imagefolder):
    csv = imagefolder / "n.csv"
    csv.write_text("path,label\ncat/0.png,10\ndog/1.jpg,9\n")
    assert CsvSource(csv).classes == ["9", "10"]


@pytest.mark.parametrize(
    "text, message",
    [("file,label\na.png,x\n", "lacks column"), ("path,label\na.png,\n", "line 2: empty"), ("path,label\n", "no images")],
)
def test_csv_errors(imagefolder, text, message):
    csv = imagefolder / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataSourceError, match=message):
        CsvSource(csv)


def test_imagefolder_errors(tmp_path, imagefolder):
    with pytest.raises(DataSourceError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataSourceError, match="is a file"):
        ImageFolder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no class folders"):
        ImageFolder(tmp_path / "empty")
    (imagefolder / "fox").mkdir()
    with pytest.raises(DataSourceError, match="fox.*holds no images"):
        ImageFolder(imagefolder)


def test_digits_fixed_split():
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 540
    assert not set(train.ids) & set(test.ids)
    assert Digits("train").ids == train.ids and train.fingerprint() == Digits("train").fingerprint()
    assert train.classes == [str(i) for i in range(10)]
    assert np.bincount(test.labels).min() >= 50
    assert train.load(0).size == (32, 32)


def test_open_source_errors():
    with pytest.raises(DataSourceError, match="unknown data source 'imgfolder'"):
        open_source("imgfolder:/x", "train")
    with pytest.raises(DataSourceError, match="needs a path"):
        open_source("csv", "train")
    with pytest.raises(DataSourceError, match="splits train, test"):
        open_source("digits", "val")


def test_digits_shifted_keeps_classes_and_ids_of_test():
    test, shifted = Digits("test"), Digits("shifted")
    assert shifted.ids == test.ids and shifted.classes == test.classes
    assert shifted.fingerprint() != test.fingerprint()
    a, b = np.asarray(test.load(0)), np.asarray(shifted.load(0))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_textures_are_reproducible_per_split():
    from backbench.extract.datasets import Textures

    a, b, c = Textures("test"), Textures("test"), Textures("val")
    assert len(a) == 200 and a.classes[0] == "stripes"
    assert np.array_equal(np.asarray(a.load(7)), np.asarray(b.load(7)))
    assert not np.array_equal(np.asarray(a.load(7)), np.asarray(c.load(7)))
    assert open_source("textures", "x").load(0).mode == "RGB"
