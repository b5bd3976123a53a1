"""Feature kinds (cls, mean-patch, intermediate blocks) and test-time views, against timm's own
forward, through extraction, the cache and the probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbench.errors import BackbenchError, GroupNotFound
from backbench.extract.backbones import load_backbone
from backbench.extract.datasets import Digits
from backbench.extract.kinds import expand, kinds_forward, probe_kinds
from backbench.extract.run import extract
from backbench.probe.data import load_split
from backbench.probe.tasks import run_probe
from backbench.store import Cache

VIT, CNN = "timm:test_vit@random", "timm:test_resnet@random"


def _x(bb, n=3):
    c, h, w = bb.preprocess.input_size
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_kinds_equal_timm_by_hand():
    bb = load_backbone(VIT)
    m, x = bb.model, _x(bb)
    feats, logits = kinds_forward(bb, x, ["pooled", "cls", "mean-patch", "cls+mean-patch", "layer-1:cls",
                                          "layer-3:mean-patch"])
    with torch.inference_mode():
        tokens = m.forward_features(x)
        p = m.num_prefix_tokens
        torch.testing.assert_close(feats["pooled"], m.forward_head(tokens, pre_logits=True))
        torch.testing.assert_close(feats["cls"], tokens[:, 0])
        torch.testing.assert_close(feats["mean-patch"], tokens[:, p:].mean(1))
        torch.testing.assert_close(feats["cls+mean-patch"], torch.cat([tokens[:, 0], tokens[:, p:].mean(1)], 1))
        torch.testing.assert_close(feats["layer-1:cls"], tokens[:, 0], atol=1e-5, rtol=1e-5)  # the last block, normed
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk in m.blocks[: len(m.blocks) - 2]:  # the third block from the end
            h = blk(h)
        torch.testing.assert_close(feats["layer-3:mean-patch"], m.norm(h)[:, p:].mean(1), atol=1e-5, rtol=1e-5)


def test_cnn_has_mean_patch_but_no_cls():
    bb = load_backbone(CNN)
    feats, _ = kinds_forward(bb, _x(bb), ["mean-patch", "layer-2:mean-patch"])
    with torch.inference_mode():
        torch.testing.assert_close(feats["mean-patch"], bb.model.forward_features(_x(bb)).mean((2, 3)))
    assert feats["layer-2:mean-patch"].ndim == 2
    with pytest.raises(BackbenchError, match="needs a class token.*mean-patch"):
        kinds_forward(bb, _x(bb), ["cls"])


def test_kind_names():
    assert expand(["pooled", "cls"], [-1, -4]) == ["pooled", "cls", "layer-1:cls", "layer-4:cls"]
    assert expand(None, [-2]) == ["pooled", "layer-2:cls"]
    assert probe_kinds("last3:cls") == ["layer-1:cls", "layer-2:cls", "layer-3:cls"]
    with pytest.raises(BackbenchError, match="feature kind 'layer-2:pooled'"):
        expand(["layer-2:pooled"], None)
    with pytest.raises(BackbenchError, match="-1 is the last block"):
        expand(["cls"], [0])


def test_extract_kinds_and_views_into_the_cache_and_probe_them(cache_path):
    src = Digits("test")
    res = extract(VIT, src, cache=cache_path, dataset="d", split="test", limit=48, workers=0, batch_size=16,
                  features=["pooled", "cls", "cls+mean-patch"], layers=[-1, -2])
    assert res.rows_written == 48
    cache = Cache(cache_path, mode="r+")
    bb = load_backbone(VIT)
    tf = bb.preprocess.to_uint8()
    x = bb.preprocess.normalize(torch.stack([tf(src.load(i)) for i in range(48)]))
    with torch.inference_mode():
        want, _ = kinds_forward(bb, x, ["cls", "layer-2:cls"])
    cls = cache.group(VIT, "d", "test", "cls")
    assert cls.attrs["feature_kind"] == "cls" and cls.path.endswith("/d/test~cls")
    np.testing.assert_allclose(cls.features(dtype=np.float32), want["cls"].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(cache.group(VIT, "d", "test", "layer-2:cls").features(dtype=np.float32),
                               want["layer-2:cls"].numpy(), atol=2e-3, rtol=2e-3)
    assert cache.group(VIT, "d", "test", "cls+mean-patch").dim == 2 * cls.dim
    assert len({g.chunk_rows for g in Cache(cache_path, mode="r").groups()}) == 1
    # views: the mirrored image, and the average of both, stored beside the center view
    extract(VIT, src, cache=cache_path, dataset="d", split="test", limit=48, workers=0, batch_size=16,
            features=["cls"], views="flip")
    extract(VIT, src, cache=cache_path, dataset="d", split="test", limit=48, workers=0, batch_size=16,
            features=["cls"], views="center+flip")
    flip = cache.group(VIT, "d", "test", "cls@flip")
    assert flip.attrs["feature_kind"] == "cls@flip" and flip.path.endswith("/d/test~cls@flip")
    with torch.inference_mode():
        mirrored, _ = kinds_forward(bb, x.flip(-1), ["cls"])
    np.testing.assert_allclose(flip.features(dtype=np.float32), mirrored["cls"].numpy(), atol=2e-3, rtol=2e-3)
    both = cache.group(VIT, "d", "test", "cls@center+flip").features(dtype=np.float32)
    np.testing.assert_allclose(both, (want["cls"].numpy() + mirrored["cls"].numpy()) / 2, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(load_split(cache, VIT, "d", "test", kind="cls@flip").X,
                                  flip.features(dtype=np.float32))
    with pytest.raises(BackbenchError, match="extract views with --views flip"):
        expand(["cls@flip"], None)
    # probes pick a kind, or a concatenation of the last blocks (DINOv2)
    split = load_split(cache, VIT, "d", "test", kind="last2:cls")
    np.testing.assert_array_equal(split.X, np.hstack([cache.group(VIT, "d", "test", "layer-1:cls").features(
        dtype=np.float32), cache.group(VIT, "d", "test", "layer-2:cls").features(dtype=np.float32)]))
    with pytest.raises(GroupNotFound, match="no 'mean-patch' features.*--features mean-patch"):
        load_split(cache, VIT, "d", "test", kind="mean-patch")


def test_probe_records_of_kinds_are_their_own_rows(cache_path, run_cli):
    for split in ("train", "test"):
        extract(VIT, Digits(split), cache=cache_path, dataset="d", split=split, limit=80, workers=0,
                features=["pooled", "cls"])
    cache = Cache(cache_path, mode="r+")
    pooled, _ = run_probe(cache, VIT, "d", "train", "test", Cs=[1.0])
    cls, _ = run_probe(cache, VIT, "d", "train", "test", Cs=[1.0], features="cls")
    assert pooled["backbone"] == VIT and cls["backbone"] == f"{VIT}#cls" and pooled["key"] != cls["key"]
    code, out, err = run_cli("probe", "-b", VIT, "-d", "d", "--train", "train", "--eval", "test", "--C", "1",
                             "--features", "cls", "--cache", cache_path, "--json")
    assert code == 0, err
    assert '"reused": true' in out and f"{VIT}#cls" in out
    code, _, err = run_cli("probe", "-b", VIT, "-d", "d", "--train", "train", "--eval", "test",
                           "--features", "clss", "--cache", cache_path)
    assert code == 1 and "feature kind 'clss'" in err


def test_a_battle_mixes_kinds_and_reports_them_as_rows(tmp_path, run_cli):
    cfg = tmp_path / "b.toml"
    cfg.write_text("\n".join([
        'backbones = ["timm:test_vit@random", "timm:test_vit@random#cls+mean-patch", '
        '"timm:test_resnet@random#layer-2:mean-patch"]',
        "workers = 0",
        "[datasets.digits]", 'source = "digits"', 'splits = ["train", "test"]', "limit = 80",
        "[tasks.probe]", "C = [0.1, 1.0]", "[tasks.knn]", "k = [5]",
    ]))
    cache = str(tmp_path / "b.zarr")
    code, out, err = run_cli("battle", str(cfg), "--cache", cache, "--json")
    assert code == 0, err
    from backbench.report.leaderboard import build
    from backbench.store.results import ResultsLog

    lb = build(ResultsLog(Cache(cache, mode="r")).records())
    assert sorted(lb.backbones) == ["timm:test_resnet@random#layer-2:mean-patch", "timm:test_vit@random",
                                    "timm:test_vit@random#cls+mean-patch"]
    assert not np.isnan(lb.values).any()
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("#cls+mean-patch", "#clss"))
    code, _, err = run_cli("battle", str(bad), "--cache", cache)
    assert code != 0 and "backbone 'timm:test_vit@random#clss'" in err


def test_kind_groups_travel_through_merge_export_import(tmp_path):
    from backbench.store.export import export_h5, import_h5
    from backbench.store.merge import merge
    from backbench.store.verify import verify

    a = Cache(str(tmp_path / "a.zarr"))
    extract(VIT, Digits("test"), cache=a, dataset="d", split="test", limit=32, workers=0, features=["pooled", "cls"])
    merged = Cache(str(tmp_path / "m.zarr"))
    merge([Cache(a.path, mode="r")], merged)
    back = Cache(str(tmp_path / "h.zarr"))
    export_h5(Cache(a.path, mode="r"), tmp_path / "a.h5")
    import_h5(tmp_path / "a.h5", back)
    for c in (merged, back):
        c = Cache(c.path, mode="r")
        assert sorted(g.path for g in c.groups()) == sorted(g.path for g in Cache(a.path, mode="r").groups())
        np.testing.assert_array_equal(c.group(VIT, "d", "test", "cls").features(),
                                      a.group(VIT, "d", "test", "cls").features())
        assert verify(c) == ([], 2)


def test_cli_extract_features_layers_views(cache_path, run_cli):
    code, out, err = run_cli("extract", VIT, "--data", "digits", "--dataset", "d", "--split", "test", "--limit", "16",
                             "--workers", "0", "--features", "pooled", "cls", "--layers", "-1", "-2",
                             "--views", "center+flip", "--cache", cache_path)
    assert code == 0, err
    code, out, _ = run_cli("ls", "--cache", cache_path, "--json")
    import json

    kinds = sorted(r["features"] for r in json.loads(out))
    assert kinds == ["cls@center+flip", "layer-1:cls@center+flip", "layer-2:cls@center+flip",
                     "pooled@center+flip"]
    code, _, err = run_cli("extract", CNN, "--data", "digits", "--dataset", "d", "--split", "test", "--limit", "16",
                           "--workers", "0", "--features", "cls", "--cache", cache_path)
    assert code == 1 and "needs a class token" in err and "Traceback" not in err


def test_info_shows_a_kind(cache_path, run_cli):
    extract(VIT, Digits("test"), cache=cache_path, dataset="d", split="test", limit=16, workers=0,
            features=["pooled", "mean-patch"])
    code, out, err = run_cli("info", VIT, "d", "test", "--features", "mean-patch", "--cache", cache_path, "--json")
    assert code == 0, err
    import json

    assert json.loads(out)["feature_kind"] == "mean-patch"
