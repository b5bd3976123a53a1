"""Property: any folder of any bytes gives a correct extraction or one clear error."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backbench.errors import BackbenchError
from backbench.extract.backbones import load_backbone
from backbench.extract.datasets import ImageFolder
from backbench.extract.run import extract
from backbench.store import Cache

BACKBONE = load_backbone("timm:test_resnet@random")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


files = st.lists(st.one_of(st.binary(max_size=64).map(lambda b: ("junk", b)),
                           st.integers(0, 1000).map(lambda s: ("png", _png(s)))), max_size=3)
folders = st.dictionaries(st.sampled_from(["a", "b", "c"]), files, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(folders, st.sampled_from(["skip", "fail"]))
def test_any_folder_extracts_correctly_or_fails_clearly(layout, on_error):
    root = Path(tempfile.mkdtemp())
    try:
        for cls, items in layout.items():
            (root / "data" / cls).mkdir(parents=True)
            for i, (_, data) in enumerate(items):
                (root / "data" / cls / f"{i}.png").write_bytes(data)
        valid = sum(kind == "png" for items in layout.values() for kind, _ in items)
        total = sum(len(items) for items in layout.values())
        try:
            res = extract(BACKBONE, ImageFolder(root / "data"), cache=str(root / "c.zarr"), dataset="p",
                          split="s", workers=0, on_error=on_error)
        except BackbenchError as exc:
            message = str(exc)
            assert "\n" not in message and message
            junk_decodes = valid < total  # random bytes may still form a valid image header: rare
            assert total == 0 or not layout or any(not items for items in layout.values()) or junk_decodes
            return
        group = Cache(str(root / "c.zarr")).group(BACKBONE.name, "p", "s")
        labels = group.labels()
        assert res.status == "extracted" and len(labels) == total
        assert (labels >= 0).sum() + len(res.skipped) == total and (labels >= 0).sum() >= valid
        assert np.isfinite(group.features()[labels >= 0].astype(np.float32)).all()
    finally:
        shutil.rmtree(root, ignore_errors=True)
