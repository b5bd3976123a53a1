"""Bad inputs, concurrency and verification: clear errors, nothing lost, nothing torn."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from backbench.errors import SampleError
from backbench.extract.run import extract
from backbench.store.results import ResultsLog
from backbench.store import Cache
from backbench.store.verify import verify
from conftest import write_image

RESNET = "timm:test_resnet@random"


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file per failure mode a user meets in the wild (names sort after the good ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_image(folder / "tmp.jpg", seed=1, size=(64, 64))
    data = good.read_bytes()
    good.unlink()
    files = {"truncated": folder / "z_truncated.jpg", "empty": folder / "z_empty.jpg", "text": folder / "z_text.jpg"}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    return files


def _odd_modes(folder: Path) -> list[Path]:
    """Decodable images in awkward modes: CMYK, LA, P, 16-bit, animated GIF."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    paths = [folder / "m_cmyk.jpg", folder / "m_la.png", folder / "m_p.png", folder / "m_16.png", folder / "m_anim.gif"]
    rgb.convert("CMYK").save(paths[0])
    rgb.convert("LA").save(paths[1])
    rgb.convert("P").save(paths[2])
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(paths[3])
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(paths[4], save_all=True, append_images=frames[1:], duration=50, loop=0)
    return paths


@pytest.fixture
def messy(tmp_path, imagefolder):
    files = _bad_files(imagefolder / "eel")
    _odd_modes(imagefolder / "dog")
    return imagefolder, files


def test_odd_modes_decode_to_rgb(tmp_path):
    from backbench.extract.datasets import open_rgb

    for p in _odd_modes(tmp_path):
        img = open_rgb(p)
        assert img.mode == "RGB" and img.size == (20, 20)
    sixteen = np.asarray(open_rgb(tmp_path / "m_16.png"))
    assert 50 < sixteen.mean() < 200  # scaled from 16 bits, not clipped to white


def test_decompression_bomb_is_a_sample_error(tmp_path, monkeypatch):
    from backbench.extract.datasets import open_rgb

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = write_image(tmp_path / "big.png", seed=0, size=(20, 20))
    with pytest.raises(SampleError, match="big.png.*DecompressionBomb"):
        open_rgb(path)


def test_on_error_fail_names_the_file_and_keeps_finished_chunks(messy, cache_path):
    root, files = messy
    with pytest.raises(SampleError, match=r"z_.*\.jpg.*--on-error skip"):
        extract(RESNET, f"imagefolder:{root}", cache=cache_path, dataset="m", split="s", workers=0, chunk_rows=4,
                batch_size=4)
    group = Cache(cache_path).group(RESNET, "m", "s")
    done = group.done_chunks()
    assert done[:4].all() and not done.all()  # cat and dog chunks were written before eel's bad files
    assert group.features(complete_only=True).shape[0] == 4 * int(done.sum())


def test_on_error_skip_records_and_probes_ignore_skipped(messy, cache_path, run_cli):
    root, files = messy
    res = extract(RESNET, f"imagefolder:{root}", cache=cache_path, dataset="m", split="s", workers=0, on_error="skip")
    assert res.status == "extracted" and {Path(s["id"]).name for s in res.skipped} == {p.name for p in files.values()}
    group = Cache(cache_path).group(RESNET, "m", "s")
    labels = group.labels()
    assert (labels == -1).sum() == 3 and len(group.attrs["skipped"]) == 3
    code, out, _ = run_cli("info", RESNET, "m", "s", "--cache", cache_path)
    assert code == 0 and "skipped eel/z_empty.jpg" in out
    from backbench.probe.data import load_split

    split = load_split(Cache(cache_path), RESNET, "m", "s")
    assert len(split.y) == len(labels) - 3 and (split.y >= 0).all()


def test_verify_reports_a_flipped_byte(cache_path, run_cli):
    extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", workers=0, limit=64, chunk_rows=32)
    assert verify(Cache(cache_path, mode="r")) == ([], 2)
    chunk = Path(cache_path) / "timm~test_resnet@random/d/test/features/c/1/0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems, checked = verify(Cache(cache_path, mode="r"))
    assert checked == 2 and [(p["chunk"], p["status"]) for p in problems] == [(1, "changed")]
    code, out, _ = run_cli("verify", "--cache", cache_path)
    assert code == 1 and "changed" in out


def _extract_cmd(cache: str) -> list[str]:
    return [sys.executable, "-m", "backbench", "extract", RESNET, "--data", "digits", "--dataset", "digits",
            "--split", "test", "--cache", cache, "--limit", "256", "--chunk-rows", "32", "--workers", "0"]


def test_two_extractions_at_once_give_one_correct_cache(tmp_path):
    shared, alone = str(tmp_path / "shared.zarr"), str(tmp_path / "alone.zarr")
    procs = [subprocess.Popen(_extract_cmd(shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    subprocess.run(_extract_cmd(alone), check=True, capture_output=True)
    a = zarr.open_group(shared, mode="r")["timm~test_resnet@random/digits/test"]
    b = zarr.open_group(alone, mode="r")["timm~test_resnet@random/digits/test"]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    said = " ".join(o + e for o, e in outs)
    assert "nothing to do" in said or "waiting" in said


def test_a_new_cache_opened_by_many_at_once_opens_for_all(tmp_path):
    """zarr's open_group(mode="a") looks, then creates: a second creator in between got
    ContainsGroupError (two `backbench extract` runs into a new cache failed one time in five)."""
    for attempt in range(10):
        path, errors = str(tmp_path / f"c{attempt}.zarr"), []
        barrier = threading.Barrier(8)

        def open_it():
            barrier.wait()
            try:
                Cache(path)
            except Exception as exc:  # noqa: BLE001 - any failure is the bug
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert Cache(path, mode="r").root.attrs["backbench"] == "feature cache"


_APPEND = """
import sys
from backbench.store import Cache
from backbench.store.results import ResultsLog
log = ResultsLog(Cache(sys.argv[1], mode="r+"))
for i in range(40):
    log.run({"task": "t", "who": sys.argv[2], "i": i}, lambda: {"metrics": {"x": i, "pad": "y" * 2000}})
"""


def test_concurrent_results_appends_lose_nothing(cache_path):
    Cache(cache_path)
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND, cache_path, who]) for who in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    records = ResultsLog(Cache(cache_path, mode="r")).records()
    assert len(records) == 80 and {(r["who"], r["i"]) for r in records} == {(w, i) for w in "ab" for i in range(40)}
    assert all(r["metrics"]["pad"] == "y" * 2000 for r in records)


def test_schema1_groups_with_hex_crc32_marks_still_read_and_verify(cache_path):
    """Caches written before schema 2 (CRC-32 as hex strings, "" = not done) keep working."""
    import zlib

    from conftest import put_group

    X = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    y = np.arange(40) % 2
    put_group(cache_path, "bench:old", "d", "s", X, y, chunk_rows=16)
    group = Cache(cache_path).group("bench:old", "d", "s")
    hexes = [f"{zlib.crc32(y[a:b].astype(np.int64).tobytes(), zlib.crc32(X[a:b].tobytes())):08x}"
             for a, b in map(group.chunk_bounds, range(group.n_chunks))]
    hexes[2] = ""  # the last chunk never finished
    node = group.node
    del node["chunk_checksum"]
    node.create_array("chunk_checksum", shape=(3,), dtype=str, chunks=(1,), fill_value="")[:] = np.array(hexes)
    node.attrs.update({"checksum": "crc32", "complete": False})
    old = Cache(cache_path).group("bench:old", "d", "s")
    assert old.done_chunks().tolist() == [True, True, False]
    assert np.array_equal(old.features(complete_only=True), X[:32])
    problems, checked = verify(Cache(cache_path, mode="r"))
    assert (problems, checked) == ([], 2)
