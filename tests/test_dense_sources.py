"""Issue 21: dense data sources (segfolder:, voc:, ade20k:, coco:, shapes) against files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import DataSourceError, SampleError
from backbench.extract.datasets import (
    SOURCES, CocoDetection, SegFolder, Shapes, limit_source, open_source, split_spec, write_shapes,
)
from backbench.extract.datasets.dense import ADE20K_CLASSES, VOC_CLASSES
from conftest import write_image


def save_mask(path: Path, values: np.ndarray, *, palette: list[int] | None = None) -> Path:
    """A mask PNG holding ``values``: a palette PNG when ``palette`` is given (its index is the
    class, as VOC's), else greyscale."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = values.astype(np.uint8)
    img = Image.frombytes("P" if palette else "L", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    if palette:
        img.putpalette(palette + [0] * (768 - len(palette)))
    img.save(path)
    return path


def two_class_mask(h: int, w: int, k: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.int64)
    m[: h // 2, : w // 2] = k
    return m


@pytest.fixture
def segfolder(tmp_path: Path) -> Path:
    """IMAGES: a.jpg (40x32), b.png (30x20), sub/c.jpg (24x16); MASKS: their masks with values 0..2."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name, size, k in [("a.jpg", (40, 32), 1), ("b.png", (30, 20), 2), ("sub/c.jpg", (24, 16), 1)]:
        write_image(images / name, seed=k, size=size)
        save_mask(masks / (name.rsplit(".", 1)[0] + ".png"), two_class_mask(size[1], size[0], k))
    return tmp_path


def test_segfolder_pairs_images_with_masks_by_name(segfolder):
    src = open_source(f"segfolder:{segfolder / 'images'}:{segfolder / 'masks'}", "ignored")
    assert isinstance(src, SegFolder) and src.dense == {"mask"} and src.ignore_index == 255
    assert src.ids == ["a.jpg", "b.png", "sub/c.jpg"] and src.labels.tolist() == [0, 0, 0]
    assert src.classes == ["0", "1", "2"]  # the largest mask value is 2
    assert src.image_size(0) == (32, 40) and src.image_size(2) == (16, 24)
    mask = src.mask(1)
    assert mask.dtype == np.int64 and mask.shape == (20, 30)
    assert mask[0, 0] == 2 and mask[10, 15] == 0 and (mask == 2).sum() == 10 * 15
    assert src.load(0).size == (40, 32)
    assert src.describe()["dense"] == ["mask"]


def test_segfolder_names_classes_from_classes_txt(segfolder):
    (segfolder / "classes.txt").write_text("sky\nroad\ncar\n\n")
    src = SegFolder(segfolder / "images", segfolder / "masks")
    assert src.classes == ["sky", "road", "car"]
    (segfolder / "masks" / "classes.txt").write_text("sky\nroad\n")  # inside MASKS wins; 2 is now out of range
    src = SegFolder(segfolder / "images", segfolder / "masks")
    assert src.classes == ["sky", "road"] and src.mask(0)[0, 0] == 1
    with pytest.raises(SampleError, match=r"b\.png' holds the value 2, but segfolder:.* has 2 classes \(values 0\.\.1, "
                                          r"255 unlabelled\); fix the mask, or name every class in classes.txt"):
        src.mask(1)


def test_a_missing_mask_is_refused_naming_the_image_and_the_fix(segfolder):
    (segfolder / "masks" / "b.png").unlink()
    with pytest.raises(DataSourceError) as info:
        SegFolder(segfolder / "images", segfolder / "masks")
    text = str(info.value)
    assert f"1 of 3 images have no mask: 'b.png' wants '{segfolder / 'masks' / 'b.png'}', which does not exist" in text
    assert "add the masks, or move those images out" in text and "\n" not in text


def test_an_rgb_mask_or_a_mask_of_another_size_is_refused(segfolder):
    from PIL import Image

    Image.new("RGB", (40, 32), (128, 0, 0)).save(segfolder / "masks" / "a.png")
    save_mask(segfolder / "masks" / "b.png", np.zeros((10, 30)))
    src = SegFolder(segfolder / "images", segfolder / "masks")
    with pytest.raises(SampleError, match=r"a.png' is a RGB image; a mask holds one class index per pixel: save it "
                                          r"as a palette \(P\) or greyscale \(L\) PNG, not colours"):
        src.classes  # K is found by reading every mask
    (segfolder / "classes.txt").write_text("sky\nroad\ncar\n")
    src = SegFolder(segfolder / "images", segfolder / "masks")
    with pytest.raises(SampleError, match="a.png' is a RGB image"):
        src.mask(0)
    with pytest.raises(SampleError, match=r"b.png' is 30x10 but its image 'b.png' is 30x20; a mask labels its image "
                                          r"pixel for pixel"):
        src.mask(1)


def test_the_fingerprint_follows_the_masks(segfolder):
    images, masks = segfolder / "images", segfolder / "masks"
    before = SegFolder(images, masks).fingerprint()
    assert SegFolder(images, masks).fingerprint() == before
    save_mask(masks / "b.png", np.random.default_rng(0).integers(0, 3, (20, 30)))  # same size, other labels
    assert SegFolder(images, masks).fingerprint() != before
    changed = SegFolder(images, masks).fingerprint()
    (segfolder / "classes.txt").write_text("x\ny\nz\n")  # other class names
    assert SegFolder(images, masks).fingerprint() != changed


def test_limit_keeps_masks_aligned(segfolder):
    src = SegFolder(segfolder / "images", segfolder / "masks")
    sub = limit_source(src, 2)
    assert sub.ids == ["a.jpg", "b.png"] and (sub.mask(1) == src.mask(1)).all()
    assert sub.fingerprint() != src.fingerprint()


def write_voc(root: Path) -> Path:
    """A VOCdevkit/VOC2012 tree: 3 images, palette masks with VOC's colours and its 255 border."""
    voc = root / "VOCdevkit" / "VOC2012"
    palette = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 13 + [192, 128, 128]  # index 15 (person) is VOC's pink
    palette += [0, 0, 0] * (255 - 16) + [224, 224, 192]  # 255: the border colour
    for n, stem in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        write_image(voc / "JPEGImages" / f"{stem}.jpg", seed=n, size=(20, 12))
        m = np.zeros((12, 20), dtype=np.int64)
        m[3:9, 5:15] = 15 if n != 1 else 1
        m[3, 5:15] = m[8, 5:15] = 255  # the object's outline is unlabelled, as in VOC
        save_mask(voc / "SegmentationClass" / f"{stem}.png", m, palette=palette)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007_000039\n")
    (lists / "val.txt").write_text("2007_000063\n")
    (lists / "trainval.txt").write_text("2007_000032\n2007_000039\n2007_000063\n")
    return voc


def test_voc_reads_palette_indices_and_the_255_border(tmp_path):
    voc = write_voc(tmp_path)
    src = open_source(f"voc:{tmp_path}", "train")  # VOCdevkit above VOC2012 is found
    assert src.classes == list(VOC_CLASSES) and len(src.classes) == 21 and src.classes[15] == "person"
    assert src.ids == ["JPEGImages/2007_000032.jpg", "JPEGImages/2007_000039.jpg"] and src.ignore_index == 255
    mask = src.mask(0)
    assert mask[5, 7] == 15 and mask[0, 0] == 0 and mask[3, 7] == 255 and (mask == 255).sum() == 20
    assert src.mask(1)[5, 7] == 1 and src.image_size(0) == (12, 20)
    assert open_source(f"voc:{voc}", "val").ids == ["JPEGImages/2007_000063.jpg"]
    assert len(open_source(f"voc:{voc}", "trainval")) == 3
    with pytest.raises(DataSourceError, match=r"voc: has splits train, trainval, val in .*, not 'test'"):
        open_source(f"voc:{voc}", "test")
    with pytest.raises(DataSourceError, match=r"is not a Pascal VOC 2012 folder.*point voc: at VOCdevkit/VOC2012"):
        open_source(f"voc:{voc / 'JPEGImages'}", "train")


def test_voc_refuses_a_colour_converted_mask(tmp_path):
    from PIL import Image

    voc = write_voc(tmp_path)
    path = voc / "SegmentationClass" / "2007_000063.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(SampleError, match="is a RGB image"):
        open_source(f"voc:{voc}", "val").mask(0)


def write_ade(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    for folder, names in [("training", ["ADE_train_00000001", "ADE_train_00000002"]),
                          ("validation", ["ADE_val_00000001"])]:
        for n, stem in enumerate(names):
            write_image(ade / "images" / folder / f"{stem}.jpg", seed=n, size=(16, 8))
            m = np.zeros((8, 16), dtype=np.int64)  # 0: "other"
            m[:, 4:8], m[:, 8:12], m[:, 12:] = 1, 150, 2 + n
            save_mask(ade / "annotations" / folder / f"{stem}.png", m)
    return ade


def test_ade20k_shifts_values_down_and_ignores_zero(tmp_path):
    ade = write_ade(tmp_path)
    src = open_source(f"ade20k:{tmp_path}", "train")
    assert src.ids == ["images/training/ADE_train_00000001.jpg", "images/training/ADE_train_00000002.jpg"]
    assert len(src.classes) == 150 and src.classes[0] == "wall" and src.classes[149] == "flag"
    assert src.classes == list(ADE20K_CLASSES) and src.ignore_index == 255
    mask = src.mask(1)
    assert mask[0].tolist() == [255] * 4 + [0] * 4 + [149] * 4 + [2] * 4  # 0 -> 255, 1 -> 0, 150 -> 149, 3 -> 2
    assert open_source(f"ade20k:{ade}", "validation").ids == open_source(f"ade20k:{ade}", "val").ids
    with pytest.raises(DataSourceError, match=r"ade20k: has splits train \(training\), val \(validation\); not 'test'"):
        open_source(f"ade20k:{ade}", "test")
    m = np.zeros((8, 16))
    m[0, 0] = 151
    save_mask(ade / "annotations" / "validation" / "ADE_val_00000001.png", m)
    with pytest.raises(SampleError, match=r"holds the value 151, but ade20k:.* has 150 classes \(values 1\.\.150"):
        open_source(f"ade20k:{ade}", "val").mask(0)


def coco_json(path: Path, **changes) -> Path:
    """Three images (b.jpg has no boxes), categories with ids 3, 1, 7 listed out of order."""
    data = {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 40, "height": 32},
                   {"id": 11, "file_name": "b.jpg", "width": 40, "height": 32},
                   {"id": 12, "file_name": "c.jpg"}],
        "categories": [{"id": 7, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2.5, 4, 10, 6], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped to 40x32
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 32], "iscrowd": 1},  # crowd: left out
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 5, "image_id": 12, "category_id": 7, "bbox": [5, 5, 0, 4]},  # no area: left out
        ],
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    for n, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        write_image(tmp_path / "images" / name, seed=n, size=(40, 32))
    return tmp_path / "images", coco_json(tmp_path / "instances.json")


def test_coco_boxes_become_xyxy_with_categories_in_id_order(coco):
    images, ann = coco
    src = open_source(f"coco:{images}:{ann}", "ignored")
    assert isinstance(src, CocoDetection) and src.dense == {"boxes"}
    assert src.classes == ["person", "car", "zebra"] and src.ids == ["a.jpg", "b.jpg", "c.jpg"]
    boxes, labels = src.boxes(0)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    assert boxes.tolist() == [[2.5, 4, 12.5, 10], [30, 20, 40, 32]] and labels.tolist() == [1, 2]
    boxes, labels = src.boxes(1)  # no annotations: kept, with zero boxes
    assert boxes.shape == (0, 4) and labels.shape == (0,) and boxes.dtype == np.float32
    boxes, labels = src.boxes(2)
    assert boxes.tolist() == [[1, 2, 4, 6]] and labels.tolist() == [0]
    assert src.image_size(0) == (32, 40) and src.image_size(2) == (32, 40)
    with pytest.raises(DataSourceError, match="has no segmentation masks"):
        src.mask(0)


def test_coco_fingerprint_follows_the_boxes(coco):
    images, ann = coco
    before = CocoDetection(images, ann).fingerprint()
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [2.5, 4, 10, 7]
    ann.write_text(json.dumps(data))
    assert CocoDetection(images, ann).fingerprint() != before
    assert limit_source(CocoDetection(images, ann), 1).fingerprint() != CocoDetection(images, ann).fingerprint()


def test_coco_errors_are_one_line_naming_the_file(coco, tmp_path):
    images, ann = coco
    ann.write_text(ann.read_text()[:-40])  # cut short
    with pytest.raises(DataSourceError, match=r"instances.json' is not valid JSON \(.* at line 1 column \d+\); is the "
                                              r"file whole\?"):
        CocoDetection(images, ann)
    coco_json(ann, categories=None)
    with pytest.raises(DataSourceError, match="is not a COCO instances file: it needs lists 'images' and 'categories'"):
        CocoDetection(images, ann)
    coco_json(ann, annotations=[{"id": 9, "image_id": 10, "category_id": 2, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DataSourceError, match="annotation 9 has category_id 2, which categories does not list"):
        CocoDetection(images, ann)
    coco_json(ann, annotations=[{"id": 9, "image_id": 10, "category_id": 1, "bbox": [0, 0]}])
    with pytest.raises(DataSourceError, match=r"malformed annotations entry \(ValueError: .*\); expected COCO's"):
        CocoDetection(images, ann)
    coco_json(ann, annotations=["not an object"])
    with pytest.raises(DataSourceError, match=r"malformed annotations entry \(AttributeError"):
        CocoDetection(images, ann)
    coco_json(ann)
    (images / "b.jpg").unlink()
    with pytest.raises(DataSourceError, match=r"1 of 3 images have no file: 'b.jpg' wants .*b.jpg', which does not exist; .*lists images that IMAGES"):
        CocoDetection(images, ann)
    with pytest.raises(DataSourceError, match=r"coco:/x needs IMAGES:ANNOTATIONS.json"):
        open_source("coco:/x", "val")
    write_image(images / "b.jpg", seed=0, size=(20, 32))
    with pytest.raises(SampleError, match=r"b.jpg' is 20x32 but .*instances.json' says 40x32"):
        CocoDetection(images, ann).image_size(1)


def test_shapes_are_reproducible_and_their_boxes_are_tight(tmp_path):
    from scipy import ndimage

    a, b = Shapes("train"), open_source("shapes", "train")
    assert (len(a), len(Shapes("val")), len(Shapes("test"))) == (200, 50, 100)
    assert a.classes == ["background", "disc", "square", "triangle"] and a.dense == {"mask", "boxes"}
    assert a.fingerprint() == b.fingerprint() != Shapes("val").fingerprint()
    assert np.array_equal(np.asarray(a.load(3)), np.asarray(b.load(3))) and np.array_equal(a.mask(3), b.mask(3))
    assert not np.array_equal(np.asarray(a.load(0)), np.asarray(Shapes("val").load(0)))
    counts = np.zeros(4, dtype=int)
    for i in range(40):
        mask, (boxes, labels) = a.mask(i), a.boxes(i)
        assert mask.shape == (64, 64) == a.image_size(i) and set(np.unique(mask)) <= {0, 1, 2, 3}
        parts, n = ndimage.label(mask > 0)
        found = sorted((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, int(mask[sl][parts[sl] == k + 1][0]))
                       for k, sl in enumerate(ndimage.find_objects(parts)))
        assert found == sorted((*map(int, box), int(label)) for box, label in zip(boxes, labels)), i
        assert 1 <= n <= 3 and boxes.dtype == np.float32
        counts[labels] += 1
    assert counts[0] == 0 and counts[1:].min() > 5  # every shape, never a background box
    with pytest.raises(DataSourceError, match="shapes has splits train, val, test, not 'x'"):
        Shapes("x")


def test_write_shapes_reads_back_through_segfolder_and_coco(tmp_path):
    root = write_shapes(tmp_path / "shapes", "val", n=6, seed=0)
    seg = open_source(f"segfolder:{root / 'images'}:{root / 'masks'}", "val")
    det = open_source(f"coco:{root / 'images'}:{root / 'annotations.json'}", "val")
    builtin = Shapes("val")
    assert seg.ids == det.ids == [f"{i:03d}.jpg" for i in range(6)]
    assert seg.classes == builtin.classes and det.classes == ["disc", "square", "triangle"]
    for i in range(6):
        assert np.array_equal(seg.mask(i), builtin.mask(i))
        (boxes, labels), (want, want_labels) = det.boxes(i), builtin.boxes(i)
        assert np.array_equal(boxes, want) and np.array_equal(labels, want_labels - 1)  # category ids 1..3 -> 0..2
    jpeg = np.asarray(seg.load(0), dtype=float)
    assert np.abs(jpeg - np.asarray(builtin.load(0), dtype=float)).mean() < 12  # the same image, JPEG-compressed


def test_dense_sources_are_registered():
    for kind in ("segfolder", "voc", "ade20k", "coco", "shapes"):
        assert kind in SOURCES
    assert split_spec("voc:/data/VOC2012") == ("voc", "/data/VOC2012")
    with pytest.raises(DataSourceError, match="needs a path, e.g. segfolder:/data/images:/data/masks"):
        split_spec("segfolder")
    with pytest.raises(DataSourceError, match="needs two paths"):
        open_source("segfolder:/only/images", "train")
    with pytest.raises(DataSourceError, match="has no object boxes"):
        open_source("textures", "x").boxes(0)
    assert open_source("textures", "x").image_size(0) == (64, 64) and not open_source("textures", "x").dense
