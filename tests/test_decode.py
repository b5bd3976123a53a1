"""Decoding JPEGs on the extraction device, and torch.compile: the same pixels, the same features.

On this CPU machine ``decode="device"`` runs torchvision's batched ``decode_jpeg`` on the
CPU; on a GPU the same code path hands the batch to nvJPEG (bench/gpu.py measures it).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from backbench.errors import BackbenchError, CacheMismatch, SampleError
from backbench.extract.backbones import load_backbone
from backbench.extract.datasets import Digits, ImageFolder, open_rgb
from backbench.extract.decode import DeviceDecoder, LoaderPace, jpeg_payload
from backbench.extract.loader import Images as _Images, collate_packed as _collate_packed, unpack as _unpack
from backbench.extract.run import extract
from backbench.store import Cache

RESNET = "timm:test_resnet@random"


@pytest.fixture
def jpegs(tmp_path):
    """JPEGs of several sizes (baseline, progressive, 4:4:4, grayscale), a PNG and a CMYK JPEG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "jpegs"
    specs = [("a", (40, 50), "RGB", {}), ("a", (40, 50), "RGB", {}), ("a", (64, 48), "L", {}),
             ("b", (37, 61), "RGB", {"progressive": True}), ("b", (45, 45), "RGB", {"subsampling": 0}),
             ("b", (33, 70), "CMYK", {})]
    for i, (cls, (h, w), mode, kw) in enumerate(specs):
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        img.save(root / cls / f"{i}.jpg", quality=90, **kw)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "b" / "png.png")
    return root


def test_device_decode_gives_the_workers_pixels(jpegs):
    bb = load_backbone(RESNET)
    src = ImageFolder(jpegs)
    payloads = [jpeg_payload(src.read_bytes(i)) for i in range(len(src))]
    kinds = {src.ids[i]: p is not None for i, p in enumerate(payloads)}
    assert kinds == {"a/0.jpg": True, "a/1.jpg": True, "a/2.jpg": True, "b/3.jpg": True, "b/4.jpg": True,
                     "b/5.jpg": False, "b/png.png": False}  # CMYK and PNG stay with the workers
    tf = bb.preprocess.to_uint8()
    payloads = [p if p is not None else tf(src.load(i)) for i, p in enumerate(payloads)]
    out, errors = DeviceDecoder(bb.preprocess, "cpu", None)(list(range(len(src))), payloads)
    assert errors == {}
    for i in range(len(src)):
        assert torch.equal(out[i], tf(open_rgb(jpegs / src.ids[i]))), src.ids[i]


def test_device_decode_extracts_the_same_features_and_records_it(jpegs, cache_path):
    a = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="workers",
                decode="workers", workers=0, batch_size=3)
    b = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="device",
                decode="device", workers=2, batch_size=3)
    assert a.rows_written == b.rows_written == 7
    assert (a.decoded_on_device, b.decoded_on_device) == (None, 5)  # not the PNG, not the CMYK JPEG
    cache = Cache(cache_path, mode="r")
    gw, gd = cache.group(RESNET, "j", "workers"), cache.group(RESNET, "j", "device")
    assert gd.attrs["extraction"]["decoded_on_device"] == 5
    np.testing.assert_array_equal(gw.features(), gd.features())
    assert "decode" not in gw.attrs["preprocess"]
    assert gd.attrs["preprocess"]["decode"] == "torchvision-cpu"
    assert gd.attrs["extraction"]["decode"] == "device"


def test_resume_keeps_its_decoding_and_refuses_another(jpegs, cache_path):
    extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", decode="device", workers=0)
    again = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", workers=0)  # auto
    assert again.status == "up-to-date"
    with pytest.raises(CacheMismatch, match=r"different preprocess \(decode: stored 'torchvision-cpu', "
                                            r"asked for none\); pass --overwrite"):
        extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", decode="workers",
                workers=0)


@pytest.mark.parametrize("decode", ["device", "mixed"])
def test_device_decode_names_a_truncated_jpeg(jpegs, cache_path, decode):
    data = (jpegs / "a" / "0.jpg").read_bytes()
    (jpegs / "a" / "0.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match=r"a/0\.jpg.*truncated.*--on-error skip"):
        extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", decode=decode,
                workers=0 if decode == "device" else 1)
    res = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", decode=decode,
                  workers=0, on_error="skip")
    assert [s["id"] for s in res.skipped] == ["a/0.jpg"]


def test_the_cli_says_how_much_the_device_decoded(jpegs, cache_path, run_cli):
    code, out, err = run_cli("extract", RESNET, "--data", f"imagefolder:{jpegs}", "--dataset", "j", "--split", "s",
                             "--decode", "device", "--workers", "0", "--cache", cache_path)
    assert code == 0 and "extracted 7 rows" in out and "71% decoded on the device" in out


def test_the_decoder_warms_up_on_its_thread_before_the_first_batch_and_counts_nothing(jpegs, cache_path,
                                                                                    monkeypatch):
    import threading

    calls = []
    warm_up, call = DeviceDecoder.warm_up, DeviceDecoder.__call__

    def spy(name, fn):
        def wrapped(self, *a, **kw):
            calls.append((name, threading.current_thread().name.split("_")[0]))
            return fn(self, *a, **kw)
        return wrapped

    monkeypatch.setattr(DeviceDecoder, "warm_up", spy("warm_up", warm_up))
    monkeypatch.setattr(DeviceDecoder, "__call__", spy("batch", call))
    res = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="s", decode="device",
                  workers=1, batch_size=3)
    assert calls == [("warm_up", "backbench-decode")] + [("batch", "backbench-decode")] * 3
    assert res.decoded_on_device == 5  # the warm-up's image is not one of them
    decoder = DeviceDecoder(load_backbone(RESNET).preprocess, "cpu", None)
    decoder.warm_up()
    assert decoder.decoded == 0


def test_auto_decode_is_mixed_on_a_gpu_for_files_and_the_workers_otherwise(jpegs):
    from backbench.extract.decode import resolve_decode

    files, arrays = ImageFolder(jpegs), Digits("test")
    assert resolve_decode("auto", "cuda", files) == resolve_decode("auto", "cuda:1", files) == "mixed"
    assert resolve_decode("auto", "cpu", files) == resolve_decode("auto", "cuda", arrays) == "workers"


def test_device_decode_needs_files(cache_path, run_cli):
    with pytest.raises(BackbenchError, match="--decode device needs image files"):
        extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", decode="device", limit=8)
    code, out, err = run_cli("extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "test",
                             "--limit", "8", "--decode", "gpu", "--cache", cache_path)
    assert code == 1 and "--decode 'gpu' is not one of auto, workers, device, mixed" in err


def test_mixed_decode_extracts_the_same_features_records_it_and_resumes_with_it(jpegs, cache_path):
    a = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="workers",
                decode="workers", workers=0, batch_size=2)
    b = extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="mixed",
                decode="mixed", workers=2, batch_size=2)
    assert a.rows_written == b.rows_written == 7 and 0 <= b.decoded_on_device <= 5
    cache = Cache(cache_path, mode="r")
    gm = cache.group(RESNET, "j", "mixed")
    np.testing.assert_array_equal(cache.group(RESNET, "j", "workers").features(), gm.features())
    assert gm.attrs["preprocess"]["decode"] == "torchvision-cpu+workers"
    assert gm.attrs["extraction"]["decode"] == "mixed"
    assert extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="mixed",
                   workers=0).status == "up-to-date"  # auto keeps the decoding it started with
    with pytest.raises(CacheMismatch, match=r"decode: stored 'torchvision-cpu\+workers', asked for 'torchvision-cpu'"):
        extract(RESNET, f"imagefolder:{jpegs}", cache=cache_path, dataset="j", split="mixed", decode="device",
                workers=0)


def test_a_mixed_worker_decodes_while_there_is_time_and_sends_the_rest_as_bytes(jpegs):
    """In a real DataLoader worker: a batch due later than the first round, pace not yet
    known, arrives decoded (the workers' pixels); a first-round batch, or one already due,
    as bytes; the PNG and the CMYK JPEG are decoded either way."""
    from torch.utils.data import DataLoader

    bb = load_backbone(RESNET)
    src = ImageFolder(jpegs)
    tf = bb.preprocess.to_uint8()
    batches = [list(range(len(src)))]

    def load(position: int, pace=None):
        ds = _Images(src, tf, bb.preprocess.input_size, "mixed", positions={0: position})
        ds.pace = pace or ds.pace
        (_, packed, errors), = DataLoader(ds, batch_sampler=batches, num_workers=1, collate_fn=_collate_packed)
        return packed, errors

    packed, errors = load(position=3)
    assert not any(errors) and not packed[0].any()  # nothing left for the device
    for i, img in enumerate(_unpack(packed)):
        assert torch.equal(img, tf(open_rgb(jpegs / src.ids[i]))), src.ids[i]
    assert load(position=0)[0][0].tolist() == [True] * 5 + [False, False]  # the first round: bytes
    pace = LoaderPace()
    pace.shared[:] = [3, time.monotonic(), 10.0, 1.0]  # three taken, a batch every 10 s: batch 3 is due
    assert load(position=3, pace=pace)[0][0].tolist() == [True] * 5 + [False, False]
    data = (jpegs / "a" / "0.jpg").read_bytes()  # a broken file decoded in the worker: the workers' error
    (jpegs / "a" / "0.jpg").write_bytes(data[: len(data) // 2])
    packed, errors = load(position=3)
    assert "truncated" in errors[0] and not any(errors[1:])


def test_loader_pace_is_the_devices_pace_and_a_batch_is_decoded_on_the_cpu_while_it_has_batches_to_spare():
    now = [0.0]
    pace = LoaderPace(clock=lambda: now[0])
    for t in (0.0, 0.01, 0.2):  # the first takes come in a burst: no measure of the pace
        now[0] = t
        pace.took()
    assert not pace.allows(1, workers=2, per_image=0.0) and pace.allows(2, workers=2, per_image=0.0)
    now[0] = 0.5
    pace.took(waited=0.1)  # 0.3 s since the last take, 0.1 s of it waiting for the workers
    assert pace.shared[:] == [4, 0.5, pytest.approx(0.2), 3.0]  # it waited: one more batch to spare
    # batch 4 is due at 0.7 s; with three batches to spare, batch 7 must be ready by 0.5 + 0.2
    assert not pace.allows(6, workers=2, per_image=0.0)
    assert pace.allows(7, workers=2, per_image=0.15) and not pace.allows(7, workers=2, per_image=0.2)
    now[0] = 0.9
    pace.took()  # no wait: a twentieth of a batch less to spare
    assert pace.shared[:] == [5, 0.9, pytest.approx(0.75 * 0.2 + 0.25 * 0.4), pytest.approx(2.95)]
    pace.shared[3] = 1.0
    now[0] = 1.1
    pace.took()
    assert pace.shared[3] == 1.0  # never less than one batch


def test_the_workers_see_the_main_processs_takes():
    import multiprocessing

    pace = LoaderPace()
    ctx = multiprocessing.get_context("fork")
    seen = ctx.Queue()

    def worker():
        deadline = time.monotonic() + 30
        while pace.shared[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.put(pace.shared[:])

    child = ctx.Process(target=worker)
    child.start()
    time.sleep(0.1)
    pace.took()
    assert seen.get(timeout=30)[0] == 1
    child.join()


def test_compiled_forward_gives_the_same_features(cache_path):
    """torch.compile (here its eager backend: no C++ toolchain needed) changes nothing stored."""
    plain = extract(RESNET, Digits("test"), cache=cache_path, dataset="d", split="plain", limit=40, workers=0)
    compiled = extract(RESNET, Digits("test"), cache=cache_path, dataset="d", split="compiled", limit=40,
                       workers=0, compile="eager")
    assert plain.rows_written == compiled.rows_written == 40
    cache = Cache(cache_path, mode="r")
    np.testing.assert_array_equal(cache.group(RESNET, "d", "plain").features(),
                                  cache.group(RESNET, "d", "compiled").features())
    assert cache.group(RESNET, "d", "compiled").attrs["extraction"]["compile"] == "eager"
