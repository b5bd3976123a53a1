"""The open_clip: source: the image tower is encode_image; names need ARCH/TAG or @random."""

from __future__ import annotations

import pytest
import torch

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import load_backbone, resolve


def test_open_clip_image_tower_matches_encode_image():
    import open_clip

    bb = load_backbone("open_clip:ViT-S-32@random")
    torch.manual_seed(0)
    full = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        feats, logits = bb.forward(x)
        ref = full.encode_image(x)
    assert logits is None
    torch.testing.assert_close(feats, ref)
    assert bb.preprocess.crop_pct == 1.0 and bb.preprocess.mean[0] == pytest.approx(0.48145466)


def test_open_clip_rejects_missing_tag():
    with pytest.raises(WeightsError, match="ARCH/TAG"):
        load_backbone("open_clip:ViT-S-32")
    with pytest.raises(BackboneNotFound, match="open_clip"):
        resolve("open_clip:ViT-S-32/no-such-tag")
