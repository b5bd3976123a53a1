"""Sources from outside: plugins by entry point (backbench.backbones) and custom_backbone
(any nn.Module made in this process)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backbench.errors import BackboneNotFound
from backbench.extract import backbones
from backbench.extract.backbones import SOURCES, custom_backbone, load_backbone
from backbench.extract.preprocess import Preprocess


class _FakeEntryPoint:
    def __init__(self, name, value, loader):
        self.name, self.value, self.group, self._loader = name, value, "backbench.backbones", loader

    def load(self):
        return self._loader()


def _toy_register(register_source):
    def load(spec):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        pre = Preprocess((3, 16, 16), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
        return backbones.Backbone(spec, net, pre, lambda m, x: (m(x), None), False, f"toy {spec.id}")

    register_source("toy", list_ids=lambda: ["anything"], validate=lambda ident: True)(load)


def test_entry_point_plugin_registers_a_source(monkeypatch, caplog):
    import importlib.metadata

    def broken():
        raise ImportError("No module named 'missing_dep'")

    eps = [_FakeEntryPoint("toy", "toy_pkg:register", lambda: _toy_register),
           _FakeEntryPoint("broken", "broken_pkg:register", broken)]

    def entry_points(**kw):
        assert kw == {"group": "backbench.backbones"}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(backbones, "_plugins_loaded", False)
    try:
        with caplog.at_level(logging.WARNING, logger="backbench"):
            bb = load_backbone("toy:anything")
        assert bb.name == "toy:anything" and bb.feature_dim == 4 and bb.weights_note == "toy anything"
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "'broken'" in warned[0] and "missing_dep" in warned[0]
        assert "\n" not in warned[0]
    finally:
        SOURCES.pop("toy", None)


def test_custom_backbone_extracts_into_a_cache(tmp_path):
    from backbench.extract.datasets import Digits
    from backbench.extract.run import extract
    from backbench.store import Cache

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
    bb = custom_backbone("custom:tiny", net, {"input_size": (3, 32, 32), "mean": [0.5] * 3, "std": [0.5] * 3,
                                              "crop_pct": 1.0})
    assert bb.name == "custom:tiny" and bb.feature_dim == 32 and not bb.has_logits  # 8 x 2 x 2, flattened
    assert load_backbone("custom:tiny") is bb
    cache = Cache(str(tmp_path / "c.zarr"))
    res = extract(bb, Digits("test"), cache=cache, dataset="d", split="test", limit=16, workers=0, dtype="float32")
    assert res.status == "extracted" and res.rows_written == 16
    group = Cache(str(tmp_path / "c.zarr")).group("custom:tiny", "d", "test")
    assert group.attrs["backbone"] == "custom:tiny" and group.attrs["weights_sha256"] == bb.weights_sha256
    src = Digits("test")
    x = torch.stack([bb.preprocess.to_uint8()(src.load(i)) for i in range(16)])
    with torch.inference_mode():
        ref = net(bb.preprocess.normalize(x)).flatten(1)
    np.testing.assert_allclose(group.features(), ref.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(BackboneNotFound, match="custom:NAME"):
        custom_backbone("timm:resnet18", net, bb.preprocess)


def test_custom_backbone_forward_with_logits():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    bb = custom_backbone("with_logits", net, Preprocess((3, 8, 8), (0.5,) * 3, (0.5,) * 3),
                         forward=lambda m, x: (m[0](x), m(x)))
    assert bb.name == "custom:with_logits" and bb.has_logits and bb.num_classes == 5 and bb.feature_dim == 192
