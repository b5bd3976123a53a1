"""wds:PATTERN data sources: WebDataset shards indexed once and read by offset (offline)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import DataSourceError
from backbench.extract.datasets import ImageFolder, open_source
from backbench.extract.datasets.wds import _expand_braces

RESNET = "timm:test_resnet@random"


def rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


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
