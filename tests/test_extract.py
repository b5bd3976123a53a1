"""Extraction into the cache: exact features, plain-zarr readability, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from backbench.errors import CacheError, CacheMismatch, IncompleteGroup
from backbench.extract.backbones import load_backbone
from backbench.extract.datasets import Digits, ImageFolder
from backbench.extract.run import extract
from backbench.store import Cache

RESNET = "timm:test_resnet@random"


def test_features_equal_timm_forward(imagefolder, cache_path):
    res = extract(RESNET, f"imagefolder:{imagefolder}", cache=cache_path, dataset="toy", split="train", workers=0,
                  batch_size=4)
    assert res.status == "extracted" and res.rows_written == 15
    bb, src = load_backbone(RESNET), ImageFolder(imagefolder)
    x = torch.stack([bb.preprocess.to_uint8()(src.load(i)) for i in range(len(src))])
    with torch.inference_mode():
        ref = bb.model.forward_head(bb.model.forward_features(bb.preprocess.normalize(x)), pre_logits=True)
    group = Cache(cache_path).group(RESNET, "toy", "train")
    stored = group.features()
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)
    assert group.ids().tolist() == src.ids and group.labels().tolist() == src.labels.tolist()


def test_preprocessing_matches_timm_eval_transform(imagefolder):
    import timm

    bb, src = load_backbone(RESNET), ImageFolder(imagefolder)
    timm_tf = timm.data.create_transform(**timm.data.resolve_model_data_config(bb.model), is_training=False)
    ours = bb.preprocess.normalize(bb.preprocess.to_uint8()(src.load(0))[None])[0]
    # ours rounds to uint8 before normalizing: one grey level is 1/127.5 after (x-0.5)/0.5
    assert (ours - timm_tf(src.load(0))).abs().max() < 2.5 / 127.5


def test_cache_reads_with_plain_zarr_and_dask(cache_path):
    extract(RESNET, "digits", cache=cache_path, dataset="digits", split="test", workers=0, limit=100, chunk_rows=32)
    root = zarr.open_group(cache_path, mode="r")
    node = root["timm~test_resnet@random/digits/test"]
    attrs = dict(node.attrs)
    json.dumps(attrs)  # everything is JSON
    assert attrs["backbone"] == RESNET and attrs["dataset"] == "digits" and attrs["n"] == 100
    assert attrs["complete"] is True and attrs["chunks_complete"] == [[0, 4]]
    assert len(attrs["weights_sha256"]) == 64 and attrs["preprocess"]["input_size"] == [3, 160, 160]
    assert set(attrs["versions"]) >= {"torch", "timm", "zarr"}
    feats = node["features"]
    assert feats.shape == (100, 96) and feats.chunks == (32, 96)
    assert feats.metadata.dimension_names == ("sample", "feature")
    import dask.array as da

    arr = da.from_zarr(cache_path, component="timm~test_resnet@random/digits/test/features")
    assert arr.shape == (100, 96) and float(arr.sum().compute()) == pytest.approx(float(feats[:].sum()), rel=1e-3)
    assert node["labels"][:].tolist() == Digits("test").labels[:100].tolist()


def test_rerun_does_nothing(cache_path):
    kw = dict(cache=cache_path, dataset="digits", split="test", workers=0, limit=40)
    assert extract(RESNET, "digits", **kw).status == "extracted"
    again = extract(RESNET, "digits", **kw)
    assert again.status == "up-to-date" and again.rows_written == 0


def test_workers_and_batch_size_do_not_change_features(cache_path, tmp_path):
    a = extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", workers=0, limit=50, batch_size=50)
    other = str(tmp_path / "b.zarr")
    extract(RESNET, "digits", cache=other, dataset="d", split="test", workers=2, limit=50, batch_size=7)
    fa = Cache(cache_path).group(RESNET, "d", "test").features()
    fb = Cache(other).group(RESNET, "d", "test").features()
    assert a.status == "extracted"
    np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), atol=2e-3)


def test_changed_dataset_is_refused_unless_overwrite(cache_path):
    kw = dict(cache=cache_path, dataset="digits", split="test", workers=0)
    extract(RESNET, "digits", limit=20, **kw)
    with pytest.raises(CacheMismatch, match="dataset_fingerprint.*--overwrite"):
        extract(RESNET, "digits", limit=30, **kw)
    res = extract(RESNET, "digits", limit=30, overwrite=True, **kw)
    assert res.status == "extracted" and Cache(cache_path).group(RESNET, "digits", "test").n == 30


def test_changed_weights_are_refused(cache_path, tmp_path):
    import timm

    path = tmp_path / "w.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    kw = dict(cache=cache_path, dataset="digits", split="test", workers=0, limit=10)
    extract(f"timm:test_resnet@{path}", "digits", **kw)
    torch.manual_seed(2)
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        extract(f"timm:test_resnet@{path}", "digits", **kw)


def test_incomplete_group_refuses_reads(cache_path):
    extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", workers=0, limit=96, chunk_rows=32,
            shard=(0, 2))
    group = Cache(cache_path).group(RESNET, "d", "test")
    assert not group.is_complete and group.rows_done() == 64
    with pytest.raises(IncompleteGroup, match="incomplete: 64 of 96 rows"):
        group.features()
    assert group.features(complete_only=True).shape == (64, 96)
    assert group.labels(complete_only=True).tolist() == Digits("test").labels[[*range(32), *range(64, 96)]].tolist()
    extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", workers=0, limit=96, chunk_rows=32,
            shard=(1, 2))
    assert Cache(cache_path).group(RESNET, "d", "test").is_complete


def test_cache_path_rules(tmp_path, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        Cache(str(f))
    with pytest.raises(CacheError, match="no feature cache"):
        Cache(str(tmp_path / "missing.zarr"), mode="r")
    monkeypatch.setenv("BACKBENCH_CACHE", str(tmp_path / "env.zarr"))
    assert Cache().path == str(tmp_path / "env.zarr")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BACKBENCH_CACHE")
    assert Cache().path == "features.zarr"


def test_newer_schema_is_refused(cache_path):
    Cache(cache_path).root.attrs["backbench_schema_version"] = 99
    with pytest.raises(CacheError, match="newer backbench"):
        Cache(cache_path)


def _extract_cmd(cache: str) -> list[str]:
    return [sys.executable, "-m", "backbench", "extract", RESNET, "--data", "digits", "--dataset", "digits",
            "--split", "test", "--cache", cache, "--limit", "320", "--chunk-rows", "32", "--batch-size", "8",
            "--workers", "0"]


def _chunks_done(cache: str) -> int:
    try:
        return int((zarr.open_group(cache, mode="r")["timm~test_resnet@random/digits/test/chunk_checksum"][:] >= 0).sum())
    except Exception:
        return 0


def test_resume_after_kill_gives_identical_cache(tmp_path):
    """kill -9 mid-extraction, rerun: the cache equals an uninterrupted run, array for array."""
    killed, clean = str(tmp_path / "killed.zarr"), str(tmp_path / "clean.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_extract_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while _chunks_done(killed) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _chunks_done(killed)
    assert 2 <= partial < 10
    subprocess.run(_extract_cmd(killed), env=env, check=True, capture_output=True)
    subprocess.run(_extract_cmd(clean), env=env, check=True, capture_output=True)
    a = zarr.open_group(killed, mode="r")["timm~test_resnet@random/digits/test"]
    b = zarr.open_group(clean, mode="r")["timm~test_resnet@random/digits/test"]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["complete"] and a.attrs["cache_key"] == b.attrs["cache_key"]


@pytest.mark.slow
def test_five_random_kills_then_identical_cache(tmp_path):
    """SIGKILL at 5 random points (by chunks done), rerun each time: identical to a clean run."""
    import random

    killed, clean = str(tmp_path / "k.zarr"), str(tmp_path / "c.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng, kills = random.Random(0), 0
    cmd = [a if a != "32" else "16" for a in _extract_cmd(killed)]  # 20 chunks of 16 rows
    while kills < 5 and _chunks_done(killed) < 18:
        target = _chunks_done(killed) + rng.randint(0, 2)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while _chunks_done(killed) < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 5
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    subprocess.run([a if a != killed else clean for a in cmd], env=env, check=True, capture_output=True)
    a = zarr.open_group(killed, mode="r")["timm~test_resnet@random/digits/test"]
    b = zarr.open_group(clean, mode="r")["timm~test_resnet@random/digits/test"]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["complete"] and a.attrs["n"] == 320


def test_processes_launch_shards_equal_to_one_process(tmp_path):
    sharded, single = str(tmp_path / "s.zarr"), str(tmp_path / "one.zarr")
    cmd = [sys.executable, "-m", "backbench", "extract", RESNET, "--data", "digits", "--dataset", "digits",
           "--split", "test", "--limit", "128", "--chunk-rows", "32", "--workers", "0"]
    done = subprocess.run(cmd + ["--cache", sharded, "--processes", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 shard processes finished" in done.stdout
    subprocess.run(cmd + ["--cache", single], check=True, capture_output=True)
    a = zarr.open_group(sharded, mode="r")["timm~test_resnet@random/digits/test"]
    b = zarr.open_group(single, mode="r")["timm~test_resnet@random/digits/test"]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


class _SlowDigits(Digits):
    def load(self, index: int):
        time.sleep(0.01)
        return super().load(index)


def test_extraction_says_how_long_it_waited_for_the_workers(cache_path):
    """Images that take 10 ms each to load, in the main process (workers=0): the loop waits
    80 ms for its first batch of 8 and 80 ms for each of the four later ones."""
    res = extract(RESNET, _SlowDigits("test"), cache=cache_path, dataset="d", split="slow", workers=0, limit=40,
                  batch_size=8)
    assert 0.08 <= res.first_batch_s < res.seconds and 0.32 <= res.waited_s < res.seconds
    record = Cache(cache_path).group(RESNET, "d", "slow").attrs["extraction"]
    assert record["first_batch_s"] == round(res.first_batch_s, 2) and record["waited_s"] == round(res.waited_s, 2)
    from backbench.cli.cache_cmds import _say_extracted
    from backbench.cli import out

    with out.capture() as captured:
        _say_extracted(res)
    share = res.waited_s / res.seconds
    assert f", {share:.0%} of the time waiting for images" in captured.get()


def test_dtype_and_device_choices_on_cpu(cache_path, run_cli):
    from backbench.errors import BackbenchError
    from backbench.device import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackbenchError, match="--device cpu"):
            resolve_device("cuda")
    res = extract(RESNET, "digits", cache=cache_path, dataset="d", split="test", workers=0, limit=20,
                  dtype="float32", device="cpu")
    group = Cache(cache_path).group(RESNET, "d", "test")
    assert res.status == "extracted" and group.features().dtype == np.float32
    assert group.attrs["extraction"]["device"] == "cpu"
    code, _, err = run_cli("extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "test",
                           "--dtype", "int8", "--cache", cache_path)
    assert code != 0 and "--dtype 'int8'" in err
