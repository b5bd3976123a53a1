"""The built-in ``shapes`` is a captioned set: each image's caption says how many shapes it has and
each one's size, colour, kind and place (checked against the sample's own boxes and pixels), so
``backbench retrieve --text`` runs offline on it; ``write_shapes`` writes the captions as a file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from backbench.extract.datasets import open_source, write_shapes
from backbench.extract.datasets.shapes import CLASSES, COUNTS, SIZE, Shapes, colour_name, shapes_sample

CLIP = "open_clip:ViT-S-32@random"
SHAPE = re.compile(r"a (small|large) (\w+) (disc|square|triangle) at the (top left|top right|bottom left|"
                   r"bottom right|top|bottom|left|right|centre)")


def test_colour_names_are_the_nearest():
    assert colour_name((240, 15, 30)) == "red" and colour_name((20, 40, 240)) == "blue"
    assert colour_name((235, 230, 15)) == "yellow" and colour_name((15, 160, 30)) == "green"


@pytest.mark.parametrize("split", ["val", "test"])
def test_each_caption_describes_its_sample(split):
    src = Shapes(split)
    for i, (caption,) in enumerate(src.captions):
        rgb, mask, boxes, labels = shapes_sample(f"0/{split}/{i}")
        count, _, rest = caption.partition(": ")
        assert count == COUNTS[len(labels)]
        found = SHAPE.findall(rest)
        assert len(found) == len(labels)
        for (size, colour, kind, place), j in zip(found, np.argsort(boxes[:, 0], kind="stable")):
            x1, y1, x2, y2 = boxes[j]
            assert kind == CLASSES[labels[j]] and size == ("small" if x2 - x1 < 20 else "large")
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2  # the 3x3 grid by hand
            row = "top" if cy < SIZE / 3 else "bottom" if cy >= 2 * SIZE / 3 else ""
            col = "left" if cx < SIZE / 3 else "right" if cx >= 2 * SIZE / 3 else ""
            assert place == (f"{row} {col}".strip() or "centre")
            region = mask[int(y1):int(y2), int(x1):int(x2)] == labels[j]
            assert colour == colour_name(rgb[int(y1):int(y2), int(x1):int(x2)][region].mean(axis=0))
    captions = [c for (c,) in src.captions]
    assert len(set(captions)) >= 0.98 * len(captions)  # they tell the images apart


def test_write_shapes_writes_the_captions_as_a_captions_file(tmp_path):
    root = write_shapes(tmp_path / "s", "test", n=5)
    src = open_source(f"captions:{root / 'captions.jsonl'}", "test")
    assert src.ids == [f"images/{i:03d}.jpg" for i in range(5)]
    assert src.captions == Shapes("test").captions[:5]


def test_retrieve_text_runs_on_shapes_offline(tmp_path, run_cli):
    from test_text_retrieval import clip_benchmark_recalls

    from backbench.extract.text import text_group_path
    from backbench.store import Cache
    from backbench.store.group import FeatureGroup
    from backbench.store.results import ResultsLog

    cache = str(tmp_path / "c.zarr")
    code, _, err = run_cli("extract", CLIP, "--data", "shapes", "--split", "test", "--limit", "12", "--cache", cache,
                           "--device", "cpu", "--workers", "0")
    assert code == 0, err
    code, out, err = run_cli("retrieve", "--text", "-b", CLIP, "-d", "shapes", "--query", "test", "--gallery",
                             "test", "--cache", cache)
    assert code == 0, err
    assert "recall@k, 12 images" in out
    (record,) = [r for r in ResultsLog(Cache(cache)).records() if r["task"] == "text-retrieval"]
    assert record["metrics"]["n_images"] == record["metrics"]["n_texts"] == 12
    images = Cache(cache).group(CLIP, "shapes", "test").read_labeled(dtype=np.float32)[0]
    node = Cache(cache).root[text_group_path(CLIP, record["text_group"])]
    texts, owner = FeatureGroup(node).read_labeled(dtype=np.float32)
    assert [str(t) for t in FeatureGroup(node).ids()] == [c for (c,) in Shapes("test").captions[:12]]
    for k in (1, 5, 10):
        i2t, t2i = clip_benchmark_recalls(images, texts, owner, k)
        assert record["metrics"][f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert record["metrics"][f"text_to_image_R@{k}"] == pytest.approx(t2i)
