"""The detection probe and COCO box AP: hand cases, learning a signal, determinism, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.errors import ProbeInputError
from backbench.probe.dense_metrics import coco_box_ap
from dense_helpers import SlicedMaps, one_thread  # noqa: F401  one_thread: autouse, one torch thread here

pytest.importorskip("pycocotools")

BOX = np.array([[0.0, 0.0, 10.0, 10.0]], dtype=np.float32)
ONE = np.array([0])


# ----------------------------------------------------------------------------- COCO AP by hand


def test_a_perfect_detection_scores_1():
    ap = coco_box_ap([(BOX, ONE)], [(BOX, np.array([0.9]), ONE)], [(20, 20)], 2)
    assert ap == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}


def test_a_detection_at_iou_0_6_is_right_at_50_and_wrong_at_75():
    half = np.array([[0.0, 0.0, 10.0, 6.0]])  # intersection 60 / union 100
    ap = coco_box_ap([(BOX, ONE)], [(half, np.array([0.9]), ONE)], [(20, 20)], 2)
    assert ap["ap50"] == pytest.approx(1.0) and ap["ap75"] == 0.0 and 0.0 < ap["ap"] < 0.5


def test_no_detection_scores_0_and_no_ground_truth_is_nan():
    nothing = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    assert coco_box_ap([(BOX, ONE)], [nothing], [(20, 20)], 2) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    wrong_class = (BOX, np.array([0.9]), np.array([1]))
    assert coco_box_ap([(BOX, ONE)], [wrong_class], [(20, 20)], 2)["ap50"] == 0.0
    assert all(np.isnan(v) for v in coco_box_ap([nothing[::2]], [wrong_class], [(20, 20)], 2).values())


# ----------------------------------------------------------------------------- the probe


def squares(n: int, seed: int, signal: bool = True, classes: int = 2):
    """(n, 8, 8, 16) maps of 64x64 or 96x64 (H, W) images holding 1-2 squares of 2-3 cells each;
    the cells a square covers carry its class's code (plus noise), with ``signal`` only."""
    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(99).normal(0, 1, (classes + 1, 16))
    maps, boxes, sizes = np.zeros((n, 8, 8, 16), np.float32), [], []
    for i in range(n):
        (h, w), grid, found = ((64, 64) if i % 2 == 0 else (96, 64)), np.zeros((8, 8), int), []
        for _ in range(rng.integers(1, 3)):
            side, (r, c), k = rng.integers(2, 4), rng.integers(0, 7, 2), int(rng.integers(0, classes))
            if r + side > 8 or c + side > 8 or grid[r : r + side, c : c + side].any():
                continue
            grid[r : r + side, c : c + side] = k + 1
            found.append(([c * w / 8, r * h / 8, (c + side) * w / 8, (r + side) * h / 8], k))
        maps[i] = (codes[grid] if signal else 0) + rng.normal(0, 0.3, (8, 8, 16))
        boxes.append((np.array([b for b, _ in found], np.float32).reshape(-1, 4), np.array([k for _, k in found])))
        sizes.append((h, w))
    return maps, boxes, np.array(sizes)


def probe(train, test, maps=None, **kw):
    from backbench.probe.detect import detect_probe

    params = dict(num_classes=2, input_size=(64, 64), epochs=10, batch_size=8, width=32, head_convs=1,
                  scales=(1.0, 0.5), lr=3e-3)
    return detect_probe(train[0] if maps is None else maps, train[1], test[0], test[1], train_sizes=train[2],
                        eval_sizes=test[2], **{**params, **kw})


@pytest.fixture(scope="module")
def data():
    return squares(32, 0), squares(16, 1)


@pytest.fixture(scope="module")
def result(data):
    return probe(*data)


def test_the_probe_finds_the_squares_and_noise_maps_do_not(data, result):
    (tm, tb, ts), (em, eb, es) = data
    noise = probe((squares(32, 0, signal=False)[0], tb, ts), (squares(16, 1, signal=False)[0], eb, es))
    assert result.metrics["ap50"] > 0.8 and result.metrics["n"] == 16
    assert noise.metrics["ap50"] < 0.3 and result.metrics["ap"] > noise.metrics["ap"] + 0.3
    assert len(result.detections) == 16
    boxes, scores, labels = result.detections[1]  # a 96x64 image: boxes are in its original pixels
    assert boxes.dtype == np.float32 and boxes.shape == (len(scores), 4) == (len(labels), 4)
    assert boxes[:, [1, 3]].max() <= 96 and boxes[:, [0, 2]].max() <= 64 and boxes[:, [1, 3]].max() > 64


def test_same_seed_same_numbers_and_a_sliced_array_equals_numpy(data, result):
    (tm, tb, ts), test = data
    sliced = SlicedMaps(tm)
    again = probe((tm, tb, ts), test, maps=sliced)
    assert again.metrics == result.metrics
    for a, b in zip(again.detections, result.detections):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert all(stop - start <= 8 for start, stop in sliced.reads)
    assert probe((tm, tb, ts), test, seed=1, epochs=2).metrics != result.metrics


def test_pyramid_levels_follow_the_map_size():
    from backbench.probe.detect import pyramid_scales

    assert pyramid_scales(8, 8, (0.5, 4, 1, 2)) == (4.0, 2.0, 1.0, 0.5)
    assert pyramid_scales(1, 3, (4, 2, 1, 0.5)) == (4.0, 2.0, 1.0)  # too small to pool
    with pytest.raises(ProbeInputError, match="no pyramid level"):
        pyramid_scales(1, 1, (0.5,))


def test_inputs_that_cannot_give_a_result_are_refused(data):
    (tm, tb, ts), test = data
    with pytest.raises(ProbeInputError, match="multiple of 32"):
        probe((tm, tb, ts), test, width=48)
    with pytest.raises(ProbeInputError, match="outside 0..0"):
        probe((tm, tb, ts), test, num_classes=1)
    with pytest.raises(ProbeInputError, match="train_sizes must be"):
        probe((tm, tb, ts[:-1]), test)
    with pytest.raises(ProbeInputError, match="ViTDet"):
        probe((tm, tb, ts), test, scales=(3.0,))


def _scene(rng, n_images: int, n_classes: int):
    """Ground truth and noisy scored detections (some misses, some false alarms) on random images."""
    gt, dets = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, size=(m, 2))
        boxes = np.hstack([xy, xy + rng.uniform(8, 30, size=(m, 2))])
        labels = rng.integers(0, n_classes, size=m)
        gt.append((boxes, labels))
        keep = rng.random(m) < 0.8
        found = boxes[keep] + rng.normal(0, 2.5, size=(int(keep.sum()), 4))
        extra = int(rng.integers(0, 3))
        exy = rng.uniform(0, 60, size=(extra, 2))
        found = np.vstack([found, np.hstack([exy, exy + 15])])
        dets.append((found, rng.random(len(found)).astype(np.float32),
                     np.concatenate([labels[keep], rng.integers(0, n_classes, size=extra)])))
    return gt, dets


def test_box_ap_on_resampled_images_is_cocoeval_on_the_resampled_list():
    """The report's AP replicate (weighted accumulate over COCOeval's matching, done once) equals
    pycocotools run again on the resampled image list, duplicates and all."""
    from backbench.probe.box_resample import multiplicities, weighted_box_ap
    from backbench.probe.dense_metrics import coco_box_eval

    rng = np.random.default_rng(5)
    gt, dets = _scene(rng, 40, 3)
    sizes = [(100, 100)] * 40
    metrics, matches = coco_box_eval(gt, dets, sizes, 3)
    rows = np.vstack([np.arange(40), rng.integers(0, 40, size=(4, 40))])
    got = weighted_box_ap(matches, multiplicities(rows, 40))
    assert got[0] == pytest.approx(metrics["ap"], abs=1e-12)
    for b in range(1, 5):
        again = coco_box_ap([gt[i] for i in rows[b]], [dets[i] for i in rows[b]], [sizes[i] for i in rows[b]], 3)
        assert got[b] == pytest.approx(again["ap"], abs=1e-12)
