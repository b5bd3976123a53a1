"""The dense tasks end to end on real caches: `backbench segment` / `detect`, the Python API, the
battle, records whose per-image outcomes are arrays checked by SHA-256 (and that recompute the
metrics independently: summed IoU counts, pycocotools on the stored detections), and the lesson:
ImageNet-pretrained EfficientNet-Lite maps beat a random init on mIoU and AP."""

from __future__ import annotations

import json

import numpy as np
import pytest

import backbench
from backbench.battle.config import parse_config
from backbench.battle.run import plan, run_battle
from backbench.errors import DamagedGroup
from backbench.report.leaderboard import build
from backbench.store import Cache
from backbench.store.dense import read_dense_labels
from backbench.store.results import ResultsLog

TINY = "timm:test_resnet@random"


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dense") / "d.zarr")
    for split, limit in (("train", 60), ("test", 40)):
        backbench.extract(TINY, "shapes", dataset="shapes", split=split, cache=path, features=["map"], limit=limit,
                          workers=0)
    return path


def test_segment_cli_records_outcomes_that_recompute_the_metrics(shapes_cache, run_cli):
    args = ["segment", "-b", TINY, "-d", "shapes", "--train", "train", "--eval", "test", "--cache", shapes_cache,
            "--epochs", "3", "--lr", "0.01", "0.03", "--weight-decay", "0.0001"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "miou" in out and "per-class IoU" in out and "background" in out
    code, again, _ = run_cli(*args, "--json")
    record = json.loads(again)
    assert code == 0 and record["reused"] is True and record["features"] == "map"
    assert record["params"]["selection"] == "holdout-10%" and len(record["grid"]) == 2
    arrays = ResultsLog(Cache(shapes_cache)).outcomes(record)
    assert arrays["intersection"].shape == (40, 4) == arrays["union"].shape
    # mIoU from the stored per-image counts, by hand: classes with no union are left out
    inter, union = arrays["intersection"].sum(0), arrays["union"].sum(0)
    iou = inter[union > 0] / union[union > 0]
    assert record["metrics"]["miou"] == pytest.approx(iou.mean())
    labels = read_dense_labels(Cache(shapes_cache), "shapes", "test")
    pixels = sum(labels.mask(i).size for i in range(len(labels)))
    assert record["metrics"]["pixel_acc"] == pytest.approx(arrays["intersection"].sum() / pixels)
    # the report's resampler: identity rows give the record's mIoU; a resample sums the chosen images' counts
    from backbench.probe.dense_metrics import iou_from_counts
    from backbench.tasks.base import resampler

    rs = resampler(record, arrays)
    rows = np.random.default_rng(0).integers(0, 40, size=(3, 40))
    got = rs.statistic([np.vstack([np.arange(40), rows])])
    assert got[0] == pytest.approx(record["metrics"]["miou"], abs=1e-12)
    for b, r in enumerate(rows, start=1):
        assert got[b] == pytest.approx(iou_from_counts(arrays["intersection"][r], arrays["union"][r])["miou"])


def test_detect_api_detections_rescored_by_pycocotools(shapes_cache):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    result = backbench.detect(TINY, "shapes", train="train", eval="test", cache=shapes_cache, epochs=2)
    record = result.record
    assert set(record["metrics"]) >= {"ap", "ap50", "ap75"} and record["features"] == "map"
    out = ResultsLog(Cache(shapes_cache)).outcomes(record)
    labels = read_dense_labels(Cache(shapes_cache), "shapes", "test")
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(labels.image_sizes)],
                  "categories": [{"id": c} for c in range(len(labels.classes))], "annotations": []}
    for i in range(len(labels)):
        for box, label in zip(*labels.boxes(i)):
            x1, y1, x2, y2 = (float(v) for v in box)
            gt.dataset["annotations"].append({"id": len(gt.dataset["annotations"]) + 1, "image_id": i,
                                              "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                              "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    gt.createIndex()
    off = out["det_offsets"]
    dets = [{"image_id": i, "category_id": int(out["det_labels"][j]), "score": float(out["det_scores"][j]),
             "bbox": [float(out["det_boxes"][j, 0]), float(out["det_boxes"][j, 1]),
                      float(out["det_boxes"][j, 2] - out["det_boxes"][j, 0]),
                      float(out["det_boxes"][j, 3] - out["det_boxes"][j, 1])]}
            for i in range(len(labels)) for j in range(off[i], off[i + 1])]
    assert dets, "the probe detected nothing"
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert record["metrics"]["ap"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert record["metrics"]["ap50"] == pytest.approx(ev.stats[1], abs=1e-9)
    from backbench.tasks.base import resampler  # the report's interval starts from the same AP

    assert resampler(record, out).statistic([np.arange(len(labels))[None]])[0] == pytest.approx(ev.stats[0], abs=1e-12)


def test_an_edited_outcome_array_is_refused(shapes_cache, tmp_path):
    import shutil

    import zarr

    copy = str(tmp_path / "c.zarr")
    shutil.copytree(shapes_cache, copy)
    record = backbench.segment(TINY, "shapes", train="train", eval="test", cache=copy, epochs=2, lr=[0.01],
                               weight_decay=[1e-4]).record
    arr = zarr.open_group(copy, mode="r+")[f"_results/{record['key']}/union"]
    arr[0, 0] = arr[0, 0] + 1
    with pytest.raises(DamagedGroup, match="union fails its shape, dtype or SHA-256.*--force"):
        ResultsLog(Cache(copy)).outcomes(ResultsLog(Cache(copy)).get(record["key"]))


def test_pack_and_merge_carry_the_outcomes(shapes_cache, tmp_path, run_cli):
    record = backbench.segment(TINY, "shapes", train="train", eval="test", cache=shapes_cache, epochs=2, lr=[0.01],
                               weight_decay=[1e-4]).record
    want = ResultsLog(Cache(shapes_cache)).outcomes(record)
    code, _, err = run_cli("merge", shapes_cache, "--into", str(tmp_path / "m.zarr"))
    assert code == 0, err
    merged = ResultsLog(Cache(str(tmp_path / "m.zarr")))
    got = merged.outcomes(merged.get(record["key"]))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    pack = str(tmp_path / "p.zip")
    groups = [g.path for g in Cache(shapes_cache).groups()]
    code, _, err = run_cli("pack", *groups, "--cache", shapes_cache, "--to", pack)
    assert code == 0, err
    code, _, err = run_cli("unpack", pack, "--into", str(tmp_path / "u.zarr"))
    assert code == 0, err
    unpacked = ResultsLog(Cache(str(tmp_path / "u.zarr")))
    got = unpacked.outcomes(unpacked.get(record["key"]))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_dense_tasks_refuse_what_they_cannot_read(shapes_cache, run_cli, tmp_path):
    code, _, err = run_cli("segment", "-b", TINY, "-d", "shapes", "--train", "train", "--eval", "test",
                           "--cache", shapes_cache, "--features", "cls")
    assert code == 1 and "reads a feature map" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    path = str(tmp_path / "c.zarr")
    for split in ("train", "test"):
        backbench.extract(TINY, "cifar10-mini", dataset="photos", split=split, cache=path, features=["map"],
                          limit=20, workers=0)
    code, _, err = run_cli("segment", "-b", TINY, "-d", "photos", "--train", "train", "--eval", "test",
                           "--cache", path)
    assert code == 1 and "no dense labels of photos/train" in err and "--features map" in err


def test_battle_runs_dense_tasks_on_the_datasets_that_name_them(tmp_path):
    raw = {"backbones": [TINY, "timm:test_vit@random"], "workers": 0,
           "datasets": {"digits": {"source": "digits", "splits": ["train", "test"], "limit": 60},
                        "shapes": {"source": "shapes", "splits": ["train", "test"], "limit": 40,
                                   "tasks": ["segmentation", "detection"]}},
           "tasks": {"probe": {"C": [1.0]}, "segmentation": {"epochs": 2, "lr": [0.01], "weight_decay": [1e-4]},
                     "detection": {"epochs": 1}}}
    config = parse_config(raw)
    cells = plan(config)
    extract = {(c.dataset, c.features) for c in cells if c.stage == "extract"}
    assert extract == {("digits", "pooled"), ("shapes", "map")}  # no pooled features of shapes: nothing reads them
    assert {(c.stage, c.dataset) for c in cells if c.stage != "extract"} == {
        ("probe", "digits"), ("segmentation", "shapes"), ("detection", "shapes")}
    cache = Cache(str(tmp_path / "b.zarr"))
    summary = run_battle(config, cache)
    assert not summary.failed, [(r.cell.label, r.message) for r in summary.failed]
    lb = build(ResultsLog(cache).records())
    assert {"segmentation:shapes", "detection:shapes", "probe:digits"} <= set(lb.columns)
    assert sorted(lb.backbones) == sorted(raw["backbones"])


def test_battle_config_names_unconfigured_dense_tasks():
    from backbench.battle.config import ConfigError

    raw = {"backbones": [TINY], "datasets": {"s": {"source": "shapes", "splits": ["train", "test"],
                                                   "tasks": ["segmentation"]}}, "tasks": {"probe": {}}}
    with pytest.raises(ConfigError, match=r"datasets.s.tasks names 'segmentation', which has no \[tasks.segmentation\]"):
        parse_config(raw)


@pytest.mark.slow
def test_pretrained_maps_beat_random_init_on_miou_and_ap(tmp_path):
    path = str(tmp_path / "l.zarr")
    scores = {}
    for weights in ("local", "random"):
        name = f"timm:tf_efficientnet_lite0@{weights}"
        for split, limit in (("train", 120), ("test", 50)):
            backbench.extract(name, "shapes", dataset="shapes", split=split, cache=path, features=["map"],
                              limit=limit, workers=0)
        seg = backbench.segment(name, "shapes", train="train", eval="test", cache=path, epochs=10, lr=[3e-3],
                                weight_decay=[1e-4]).metrics
        # the default light pyramid (64 channels, strides 16-64 on Lite0's stride-32 map, 20 epochs)
        det = backbench.detect(name, "shapes", train="train", eval="test", cache=path).metrics
        scores[weights] = (seg["miou"], det["ap"])
    assert scores["local"][0] > scores["random"][0] + 0.15, scores
    assert scores["local"][1] > scores["random"][1] + 0.1, scores


def test_a_streamed_map_gives_the_numbers_of_the_map_in_memory(shapes_cache):
    """MapArray read by row chunks (the probes' streaming path) against the same maps as one array."""
    from backbench.probe.maps import MapArray
    from backbench.probe.segment import segment_probe

    cache = Cache(shapes_cache)
    maps = {s: MapArray(cache.group(TINY, "shapes", s, "map")) for s in ("train", "test")}
    labels = {s: read_dense_labels(cache, "shapes", s) for s in ("train", "test")}
    masks = {s: [labels[s].mask(i) for i in range(len(labels[s]))] for s in labels}
    kw = dict(num_classes=4, ignore_index=255, lrs=[0.01], weight_decays=[1e-4], epochs=2)
    streamed = segment_probe(maps["train"], masks["train"], maps["test"], masks["test"], **kw)
    held = segment_probe(np.asarray(maps["train"]), masks["train"], np.asarray(maps["test"]), masks["test"], **kw)
    assert streamed.metrics == held.metrics
    assert np.array_equal(streamed.intersection, held.intersection)
