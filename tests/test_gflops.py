"""Forward GFLOPs per image: counted once per extraction group with torch's FLOP counter, checked
against timm's published count and a hand count, kept by a resumed run, read by the report."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from backbench.extract import flops
from backbench.extract.backbones import Backbone, BackboneSpec, load_backbone
from backbench.extract.preprocess import Preprocess
from backbench.extract.run import extract
from backbench.report.cost import cost_table
from backbench.store import Cache
from conftest import put_group

RESNET = "timm:test_resnet@random"


def _tiny(forward_fn=None) -> Backbone:
    """conv 3->8 (3x3, padding 1) on 32x32, global average pool, linear 8->4: FLOPs by hand below."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 8, 3, padding=1), "fc": torch.nn.Linear(8, 4)})

    def forward(m, x):
        feats = m["conv"](x).mean(dim=(2, 3))
        return feats, m["fc"](feats)

    pre = Preprocess(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    return Backbone(BackboneSpec("custom", "tiny"), model, pre, forward_fn or forward, True, "test",
                    feature_dim=8, num_classes=4)


# a multiply-add is 2 FLOPs: the conv makes 32*32 outputs x 8 channels, each of 3*3*3 products;
# the linear layer 8*4 (the counter counts no bias additions, pooling or other element-wise work)
HAND = 2 * (32 * 32 * 8 * 3 * 3 * 3 + 8 * 4) / 1e9


def test_a_conv_and_linear_model_counts_as_by_hand():
    assert flops.forward_gflops(_tiny()) == pytest.approx(HAND, rel=1e-9)
    assert flops._meta_flops(_tiny()) == flops._cpu_flops(_tiny()) == pytest.approx(HAND * 1e9)


def test_resnet18_matches_timms_published_gmacs():
    # timm's results table (and fvcore) give resnet18 at 224 px 1.82 GMACs: 3.64 GFLOPs at 2 per MAC
    bb = load_backbone("timm:resnet18@random")
    assert bb.preprocess.input_size == (3, 224, 224)
    assert flops.forward_gflops(bb) == pytest.approx(2 * 1.82, rel=0.005)


def test_a_vision_transformer_counts_as_by_hand():
    # open_clip's ViT-S-32 image tower at 224 px: 49 patches + the class token, width 384, 12 blocks
    # (MLP 4x), projected to 384; multiply-adds counted by hand, times 2
    T, D, L = 50, 384, 12
    patches = 49 * (3 * 32 * 32) * D
    block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D  # qkv, QK^T and AV, out, MLP
    macs = patches + L * block + D * 384
    assert flops.forward_gflops(load_backbone("open_clip:ViT-S-32@random")) == pytest.approx(2 * macs / 1e9, rel=1e-12)


def test_a_hugging_face_clip_image_tower_counts_as_by_hand(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64),
                     text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    T, D = 17, 32  # 16 patches of 8x8 + the class token
    block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 64
    macs = 16 * (3 * 8 * 8) * D + 2 * block + D * 16  # patches, 2 blocks, the projection of the class token
    assert flops.forward_gflops(load_backbone(f"hf:{tmp_path / 'clip'}")) == pytest.approx(2 * macs / 1e9, rel=1e-12)


def test_the_stable_diffusion_backbone_is_counted_alike_on_meta_and_on_the_cpu(tmp_path):
    pytest.importorskip("diffusers")
    import json

    import test_backbones_diffusers as sd

    folder = tmp_path / "tiny-sd"
    for part, model in zip(("unet", "vae", "text_encoder"), sd._models()):
        model.save_pretrained(folder / part)
    sd._tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    bb = load_backbone(f"diffusers:{folder}@random")  # the VAE encoder and the UNet's down and mid blocks
    assert flops.forward_gflops(bb) == flops._cpu_flops(bb) / 1e9 > 0


def test_torchvision_resnet18_matches_its_published_gflops():
    # torchvision's model table: resnet18 "GFLOPS 1.81" (multiply-adds): 3.63 at 2 per multiply-add
    assert flops.forward_gflops(load_backbone("torchvision:resnet18@random")) == pytest.approx(2 * 1.814, rel=0.002)


def test_a_forward_the_meta_device_cannot_run_is_counted_on_the_cpu_and_none_when_nothing_runs():
    def data_dependent(m, x):  # .item() needs values: meta tensors have none
        if x.sum().item() < -1:
            x = -x
        return _tiny().forward_fn(m, x)

    with pytest.raises(Exception):
        flops._meta_flops(_tiny(data_dependent))
    assert flops.forward_gflops(_tiny(data_dependent)) == pytest.approx(HAND, rel=1e-9)

    def broken(m, x):
        raise RuntimeError("no forward")

    assert flops.forward_gflops(_tiny(broken)) is None


def test_counting_leaves_the_model_and_its_features_unchanged():
    bb = _tiny()
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    flops.forward_gflops(bb)
    after = bb.model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(before[k], after[k]) for k in before)


def test_extraction_stores_gflops_once_and_a_resumed_run_keeps_it(cache_path, monkeypatch):
    calls = []

    def counted(backbone):
        calls.append(backbone.name)
        return flops.forward_gflops(backbone)

    monkeypatch.setattr(sys.modules["backbench.extract.run"], "forward_gflops", counted)
    opts = dict(dataset="digits", split="test", workers=0, limit=64, batch_size=16, chunk_rows=16)

    def stop(done: int, total: int) -> None:
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(RESNET, "digits", cache=cache_path, progress=stop, **opts)
    group = Cache(cache_path, mode="r").group(RESNET, "digits", "test")
    first = group.attrs["backbone_info"]["gflops"]
    assert 0 < group.rows_done() < 64 and calls == [RESNET]
    assert first == flops.forward_gflops(load_backbone(RESNET)) > 0
    assert extract(RESNET, "digits", cache=cache_path, **opts).status == "extracted"
    group = Cache(cache_path, mode="r").group(RESNET, "digits", "test")
    assert calls == [RESNET] and group.is_complete and group.attrs["backbone_info"]["gflops"] == first
    extract(RESNET, "digits", cache=cache_path, overwrite=True, **opts)  # a replaced group is counted again
    assert calls == [RESNET, RESNET]


def test_cost_table_reads_params_and_gflops_and_says_none_for_old_groups(cache_path):
    extract(RESNET, "digits", cache=cache_path, dataset="digits", split="test", workers=0, limit=16)
    rng = np.random.default_rng(0)
    put_group(cache_path, "fake:old", "digits", "test", rng.normal(size=(8, 4)).astype(np.float32),
              np.arange(8) % 2, backbone_info={"n_params": 1234})
    table = cost_table([{"cache": cache_path}, {"cache": "/no/such/cache.zarr"}, {}])
    bb = load_backbone(RESNET)
    assert table[RESNET] == {"n_params": float(sum(p.numel() for p in bb.model.parameters())),
                             "gflops": flops.forward_gflops(bb)}
    assert table["fake:old"] == {"n_params": 1234.0, "gflops": None}
