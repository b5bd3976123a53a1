"""More backbone sources: torchvision:, hf: (transformers), plugins by entry point, custom_backbone.

All offline: random init, and weights files or save_pretrained directories the tests write.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract import backbones
from backbench.extract.backbones import SOURCES, custom_backbone, load_backbone, resolve, state_dict_sha256
from backbench.extract.preprocess import Preprocess

# ------------------------------------------------------------------ torchvision


def _resnet_pooled(m, x):
    """ResNet's pre-logits by hand, without hooks: the flattened global average pool."""
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
    return torch.flatten(m.avgpool(h), 1)


def test_torchvision_random_features_are_the_input_of_the_last_linear():
    import torchvision

    bb = load_backbone("torchvision:resnet18@random")
    assert bb.model._backbench_head == "fc" and bb.feature_dim == 512
    assert not bb.has_logits and bb.num_classes == 0  # a random classifier's logits are not stored
    assert bb.weights_note == "random init (torch seed 0)"
    assert bb.weights_sha256 == load_backbone("torchvision:resnet18@random").weights_sha256
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    assert bb.weights_sha256 == state_dict_sha256(ref.state_dict())
    # from the weights' transforms preset: 224 crop of a 256 resize, bilinear, ImageNet statistics
    pre = bb.preprocess
    assert pre.input_size == (3, 224, 224) and pre.resize_to == 256 and pre.interpolation == "bilinear"
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        feats, logits = bb.forward(x)
        torch.testing.assert_close(feats, _resnet_pooled(ref, x))
    assert logits is None
    assert not bb.model._forward_pre_hooks and not bb.model.fc._forward_pre_hooks  # no hook left behind


def test_torchvision_features_match_feature_extractor():
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    bb = load_backbone("torchvision:mobilenet_v3_small@random")
    assert bb.model._backbench_head == "classifier.3" and bb.feature_dim == 1024
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_small().eval()
    node = create_feature_extractor(ref, return_nodes={"classifier.2": "pre"})  # the input of classifier.3
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], node(x)["pre"])


def test_torchvision_local_weights_with_a_fine_tuned_head(tmp_path):
    import torchvision

    torch.manual_seed(42)
    src = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    bb = load_backbone(f"torchvision:resnet18@{path}")
    assert "by name" in bb.weights_note and str(path) in bb.weights_note
    assert bb.weights_sha256 == state_dict_sha256(src.state_dict())
    assert bb.weights_sha256 != load_backbone("torchvision:resnet18@random").weights_sha256
    assert bb.has_logits and bb.num_classes == 10
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        feats, logits = bb.forward(x)
        torch.testing.assert_close(logits, src(x))
        torch.testing.assert_close(feats, _resnet_pooled(src, x))


def test_torchvision_names_tags_and_typos():
    with pytest.raises(BackboneNotFound, match="did you mean torchvision:resnet18"):
        resolve("torchvision:resnet1@random")
    spec, _ = resolve("torchvision:resnet50@IMAGENET1K_V2")  # a weights tag: checked, nothing downloaded
    assert spec.weights == "IMAGENET1K_V2"
    with pytest.raises(WeightsError, match="did you mean torchvision:resnet18@IMAGENET1K_V1"):
        resolve("torchvision:resnet18@IMAGENET1K_V2")  # resnet18 has V1 only
    with pytest.raises(BackboneNotFound, match="not an image classifier"):
        load_backbone("torchvision:fcn_resnet50@random")
    with pytest.raises(WeightsError, match="no @local"):
        load_backbone("torchvision:resnet18@local")


def test_torchvision_conv_classifier_is_pooled():
    bb = load_backbone("torchvision:squeezenet1_1@random")  # classifier: a 1x1 convolution
    assert bb.model._backbench_head == "classifier.1" and bb.feature_dim == 512
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], bb.model.features(x).mean(dim=(2, 3)))


# ------------------------------------------------------------------------ hf


def _tiny_vit(tmp_path, seed=5, pooler=True, processor=True):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    model = ViTModel(cfg, add_pooling_layer=pooler).eval()
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    if processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(folder)
    return model, folder


def test_hf_local_vit_pooler_output_and_processor(tmp_path):
    model, folder = _tiny_vit(tmp_path)
    bb = load_backbone(f"hf:{folder}")
    assert bb.name == f"hf:{folder}" and not bb.has_logits and bb.num_classes == 0
    assert str(folder) in bb.weights_note and bb.feature_dim == 32
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict())
    assert bb.preprocess == Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        feats, logits = bb.forward(x)
        torch.testing.assert_close(feats, model(pixel_values=x).pooler_output)
    assert logits is None

    rnd = load_backbone(f"hf:{folder}@random")
    assert rnd.weights_note == "random init (torch seed 0)"
    assert rnd.weights_sha256 != bb.weights_sha256
    assert rnd.weights_sha256 == load_backbone(f"hf:{folder}@random").weights_sha256
    with torch.inference_mode():
        assert not torch.allclose(rnd.forward(x)[0], feats)


def test_hf_state_dict_file_on_a_config_built_model(tmp_path):
    from safetensors.torch import save_file

    _, folder = _tiny_vit(tmp_path)
    other, _ = _tiny_vit(tmp_path / "other", seed=9)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    bb = load_backbone(f"hf:{folder}@{path}")
    assert "by name" in bb.weights_note and bb.weights_sha256 == state_dict_sha256(other.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], other(pixel_values=x).pooler_output)


def test_hf_vit_without_pooler_weights_uses_the_cls_token(tmp_path):
    model, folder = _tiny_vit(tmp_path, pooler=False)  # as DINO ViTs are saved: no pooler in the file
    bb = load_backbone(f"hf:{folder}")
    assert "CLS token" in bb.weights_note
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], model(pixel_values=x).last_hidden_state[:, 0])


def test_hf_dinov2_with_a_crop_processor(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).eval()
    model.save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "dino")
    bb = load_backbone(f"hf:{tmp_path / 'dino'}")
    pre = bb.preprocess
    assert pre.input_size == (3, 32, 32) and pre.resize_to == 36 and pre.interpolation == "bicubic"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(pixel_values=x)
        torch.testing.assert_close(bb.forward(x)[0], out.pooler_output)  # the final-norm CLS token
        torch.testing.assert_close(bb.forward(x)[0], out.last_hidden_state[:, 0])


def test_hf_convnext_config_only_dir_gets_imagenet_defaults(tmp_path):
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(2)
    model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=48)).eval()
    model.save_pretrained(tmp_path / "cnx")
    bb = load_backbone(f"hf:{tmp_path / 'cnx'}")
    assert "no image processor" in bb.weights_note
    assert bb.preprocess.input_size == (3, 48, 48) and bb.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], model(pixel_values=x).pooler_output.flatten(1))
    assert bb.feature_dim == 32


def test_hf_clip_uses_the_image_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    cfg = CLIPConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64),
                     text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    bb = load_backbone(f"hf:{tmp_path / 'clip'}")
    assert bb.feature_dim == 16
    vision = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    assert bb.n_params == vision  # the text tower is not kept
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = model.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output  # transformers 5 returns an output
        torch.testing.assert_close(bb.forward(x)[0], ref)


def test_hf_names_fail_clearly(tmp_path):
    with pytest.raises(BackboneNotFound, match="unknown hf model"):
        resolve(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="cannot read a transformers config"):
        load_backbone(f"hf:{tmp_path / 'empty'}")


# ------------------------------------------------------------- plugins, custom


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
    from backbench.extract.data import Digits
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


# ---------------------------------------------------------------------- CLI


def test_torchvision_weights_in_the_torch_hub_cache_are_on_machine(monkeypatch, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").touch()  # ResNet18_Weights.IMAGENET1K_V1's file name
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    from backbench.extract.catalog import on_machine

    rows = {r["name"]: r for r in on_machine()}
    assert "ResNet18_Weights.IMAGENET1K_V1" in rows["torchvision:resnet18"]["weights"]



def test_models_lists_torchvision_and_explains_hf(run_cli):
    code, out, _ = run_cli("models", "--source", "torchvision", "resnet", "--json")
    assert code == 0 and "torchvision:resnet18" in out and "torchvision:vit_b_16" not in out
    code, out, _ = run_cli("models", "--source", "hf")
    assert code == 0 and "any transformers vision model" in " ".join(out.split())


def test_extract_torchvision_end_to_end(run_cli, tmp_path):
    cache = str(tmp_path / "tv.zarr")
    code, out, err = run_cli("extract", "torchvision:mobilenet_v3_small@random", "--data", "digits",
                             "--dataset", "d", "--split", "test", "--limit", "16", "--workers", "0",
                             "--cache", cache, "--batch-size", "8")
    assert code == 0, err
    from backbench.store import Cache

    group = Cache(cache).group("torchvision:mobilenet_v3_small@random", "d", "test")
    assert group.n == 16 and group.features().shape == (16, 1024)
