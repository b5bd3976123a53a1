"""Issue 18 (17): CSV data sources: a UTF-8 byte-order mark, other encodings, duplicate paths."""

from __future__ import annotations

import pytest

from backbench.errors import DataSourceError
from backbench.extract.datasets import CsvSource, open_source


def test_a_byte_order_mark_is_not_part_of_the_header(imagefolder):
    csv = imagefolder / "bom.csv"
    csv.write_bytes("\ufeffpath,label\ncat/0.png,cat\ndog/1.jpg,dog\n".encode("utf-8"))
    src = CsvSource(csv)
    assert src.ids == ["cat/0.png", "dog/1.jpg"] and src.classes == ["cat", "dog"]
    plain = imagefolder / "plain.csv"
    plain.write_text("path,label\ncat/0.png,cat\ndog/1.jpg,dog\n")
    assert src.fingerprint() == CsvSource(plain).fingerprint()  # the mark changes nothing
    multi = imagefolder / "multi.csv"
    multi.write_bytes("\ufeffpath,a,b\ncat/0.png,1,0\n".encode("utf-8"))
    assert open_source(f"csv:{multi}", "x", labels=["a", "b"]).labels.tolist() == [1]


def test_a_latin1_csv_is_refused_naming_the_line_and_byte(imagefolder):
    csv = imagefolder / "latin.csv"
    csv.write_bytes("path,label\ncat/0.png,cat\ncat/2.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataSourceError) as info:
        CsvSource(csv)
    text = str(info.value)
    assert "is not UTF-8: byte 0xe9 on line 3" in text and "save the CSV as UTF-8" in text and "\n" not in text


def test_cli_gives_one_line_for_a_latin1_csv(imagefolder, tmp_path, run_cli):
    csv = imagefolder / "latin.csv"
    csv.write_bytes("path,label\ncat/0.png,f\u00fcnf\n".encode("latin-1"))
    code, out, err = run_cli("extract", "timm:test_resnet@random", "--data", f"csv:{csv}", "--dataset", "d",
                             "--split", "train", "--cache", str(tmp_path / "c.zarr"))
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "is not UTF-8: byte 0xfc on line 2" in err and "unexpected" not in err


def test_conflicting_duplicates_are_refused_naming_both_labels(imagefolder):
    csv = imagefolder / "dup.csv"
    csv.write_text("path,label\ncat/0.png,cat\ndog/1.jpg,dog\n./cat/0.png,dog\n")
    with pytest.raises(DataSourceError, match=r"lists './cat/0.png' twice with different labels: 'cat' \(line 2\) "
                                              r"and 'dog' \(line 4\)"):
        CsvSource(csv)


def test_identical_duplicates_are_refused_too(imagefolder):
    csv = imagefolder / "same.csv"
    csv.write_text("path,label\ncat/0.png,cat\ncat/0.png,cat\n")
    with pytest.raises(DataSourceError, match=r"lists 'cat/0.png' twice \(lines 2 and 3\); list each image once"):
        CsvSource(csv)


def test_multilabel_duplicates_name_the_positive_labels(imagefolder):
    csv = imagefolder / "ml.csv"
    csv.write_text("path,small,odd\ncat/0.png,1,0\ncat/0.png,1,1\n")
    with pytest.raises(DataSourceError, match=r"different labels: 'small' \(line 2\) and 'small\+odd' \(line 3\)"):
        open_source(f"csv:{csv}", "x", labels=["small", "odd"])
