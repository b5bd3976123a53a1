"""The segmentation probe and its metrics: hand-computed IoU, learning separable maps, determinism, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from backbench.errors import ProbeInputError
from backbench.probe.dense_metrics import confusion, counts, iou_from_counts
from dense_helpers import SlicedMaps, one_thread  # noqa: F401  one_thread: autouse, one torch thread here

IGNORE = 255


def separable(n: int, seed: int, classes: int = 4, noise: float = 0.5, full: int = 32):
    """(n, 8, 8, 16) maps whose every cell's vector encodes its class (plus noise), and masks at
    ``full`` x ``full`` upsampled from the 8x8 class grid (classes come in 2x2-cell blobs)."""
    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(99).normal(0, 1, (classes, 16))
    grid = rng.integers(0, classes, (n, 4, 4)).repeat(2, 1).repeat(2, 2)
    maps = (codes[grid] + rng.normal(0, noise, (n, 8, 8, 16))).astype(np.float32)
    masks = [np.kron(g, np.ones((full // 8, full // 8), dtype=np.int64)) for g in grid]
    masks[0][0, :5] = IGNORE
    return maps, masks


@pytest.fixture(scope="module")
def data():
    return separable(32, 0), separable(16, 1)


def probe(train, test, maps=None, **kw):
    from backbench.probe.segment import segment_probe

    params = dict(num_classes=4, ignore_index=IGNORE, lrs=(3e-3, 1e-2), weight_decays=(1e-4,), epochs=4,
                  batch_size=8)
    return segment_probe(train[0] if maps is None else maps, train[1], test[0], test[1], **{**params, **kw})


@pytest.fixture(scope="module")
def result(data):
    return probe(*data)


# ----------------------------------------------------------------------------- metrics by hand


def test_confusion_and_iou_equal_a_hand_computed_3x3_case():
    label = np.array([[0, 0, 1], [1, 1, 2], [IGNORE, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 2], [0, 2, 1]])
    matrix = confusion(pred, label, 4, IGNORE)  # class 3 is in neither; the ignored pixel's 0 is not counted
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    inter, union, area = counts(matrix)
    assert inter.tolist() == [1, 2, 2, 0] and union.tolist() == [3, 5, 3, 0] and area.tolist() == [2, 3, 3, 0]
    scores = iou_from_counts(inter, union, area)
    np.testing.assert_allclose(scores["iou"][:3], [1 / 3, 2 / 5, 2 / 3])
    assert np.isnan(scores["iou"][3])  # union 0: NaN, left out of the mean (mmseg)
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 5 + 2 / 3) / 3)
    assert scores["pixel_acc"] == pytest.approx(5 / 8)
    assert scores["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_a_class_only_predicted_counts_as_zero_and_counts_sum_over_images():
    label, pred = np.zeros((2, 2), dtype=np.int64), np.array([[0, 0], [0, 1]])
    per_image = np.stack([counts(confusion(pred, label, 3, None)), counts(confusion(label, label, 3, None))], axis=1)
    scores = iou_from_counts(*per_image)  # (3 counts, 2 images, 3 classes): summed over the images
    np.testing.assert_allclose(scores["iou"][:2], [7 / 8, 0.0])
    assert np.isnan(scores["iou"][2]) and scores["miou"] == pytest.approx(7 / 16)
    assert np.isnan(iou_from_counts(np.zeros(3), np.zeros(3))["miou"])


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ProbeInputError, match="outside 0..2"):
        confusion(np.zeros(3), np.array([0, 1, 3]), 3, IGNORE)


# ----------------------------------------------------------------------------- the probe


def test_the_probe_learns_separable_maps(result):
    assert result.metrics["miou"] > 0.9 and result.metrics["pixel_acc"] > 0.9
    assert result.chosen["selection"] == "holdout" and result.chosen["lr"] in (3e-3, 1e-2)
    assert [set(p) for p in result.grid] == [{"lr", "weight_decay", "miou", "pixel_acc"}] * 2
    assert result.intersection.shape == result.union.shape == result.label_area.shape == (16, 4)
    assert result.intersection.dtype == np.int64
    # the per-image counts are the whole record: the metrics follow from them alone
    assert iou_from_counts(result.intersection, result.union)["miou"] == pytest.approx(result.metrics["miou"])
    assert result.label_area.sum() == 16 * 32 * 32 - 5 and len(result.metrics["per_class_iou"]) == 4


def test_same_seed_same_numbers_and_a_sliced_array_equals_numpy(data, result):
    sliced = SlicedMaps(data[0][0])
    again = probe(*data, maps=sliced)
    assert again.metrics == result.metrics and again.grid == result.grid
    np.testing.assert_array_equal(again.intersection, result.intersection)
    assert all(stop - start <= 8 for start, stop in sliced.reads)  # read by batch-sized slices only
    other = probe(*data, seed=1)
    assert other.metrics != result.metrics


def test_val_full_resolution_loss_and_masks_of_other_sizes(data):
    (tm, tk), (em, ek) = data
    big = separable(16, 1, full=48)[1]  # the same eval images with 48x48 masks for half of them
    ek = [big[i] if i % 2 else ek[i] for i in range(len(ek))]
    result = probe((tm[:24], tk[:24]), (em, ek), val_maps=tm[24:], val_masks=tk[24:], label_scale=None,
                   lrs=(1e-2,), weight_decays=(1e-4, 1e-2))
    assert result.chosen["selection"] == "val" and len(result.grid) == 2
    assert result.metrics["miou"] > 0.9
    assert result.label_area.sum() == 8 * 32 * 32 + 8 * 48 * 48 - 5  # mask 0 ignores 5 pixels


def test_inputs_that_cannot_give_a_result_are_refused(data):
    (tm, tk), (em, ek) = data
    with pytest.raises(ProbeInputError, match="32 maps but 31 labels"):
        probe((tm, tk[:-1]), (em, ek))
    with pytest.raises(ProbeInputError, match="same backbone and --map-grid"):
        probe((tm, tk), (em[:, :4], ek))
    with pytest.raises(ProbeInputError, match="outside 0..2"):
        probe((tm, tk), (em, ek), num_classes=3)
    with pytest.raises(ProbeInputError, match="shape"):
        probe((tm[..., 0], tk), (em, ek))


def test_batches_are_slices_shuffled_within_64_row_windows_each_epoch():
    from backbench.probe.dense_data import blocks, epoch_blocks

    parts = blocks(200, 16)
    assert parts[:2] == [(0, 16), (16, 32)] and parts[-1] == (192, 200)
    order = epoch_blocks(parts, 2, seed=0)
    assert order == epoch_blocks(parts, 2, seed=0) != epoch_blocks(parts, 2, seed=1)
    first, second = order[: len(parts)], order[len(parts):]
    assert sorted(first) == sorted(second) == parts and first != second
    windows = [start // 64 for start, _ in first]  # each window's slices come together
    assert len(windows) - sum(a == b for a, b in zip(windows, windows[1:])) == 4
