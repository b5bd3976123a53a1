"""The torchvision: source: features are the input of the classifier, weights tags and files,
the torch hub cache listed as on this machine, and an extraction end to end.

All offline: random init, and weights files the tests write.
"""

from __future__ import annotations

import pytest
import torch

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import load_backbone, resolve, state_dict_sha256


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
