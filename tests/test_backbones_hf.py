"""The hf: source (transformers): save_pretrained directories and state dict files, pooling,
image processors as preprocessing, image towers of CLIP-like models, and clear failures.

All offline: random init, and save_pretrained directories the tests write.
"""

from __future__ import annotations

import pytest
import torch

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import load_backbone, resolve, state_dict_sha256
from backbench.extract.preprocess import Preprocess


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
