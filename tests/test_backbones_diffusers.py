"""The diffusers: source (the Stable Diffusion backbone as BoB runs it), offline: a tiny pipeline
folder the tests write (a UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel built from
small configs, and a CLIP tokenizer over a byte-level vocabulary), checked against diffusers' own
forward passes, through extraction (provenance, resume) and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("diffusers")

from backbench.errors import BackboneNotFound, WeightsError  # noqa: E402
from backbench.extract.backbones import load_backbone, resolve  # noqa: E402
from backbench.extract.backbones.diffusers import PREPROCESS, parse_id  # noqa: E402
from backbench.extract.datasets import open_source  # noqa: E402
from backbench.extract.run import extract  # noqa: E402
from backbench.store import Cache  # noqa: E402

N = 6


def _tokenizer(folder):
    """A CLIP tokenizer whose vocabulary is the letters (alone and ending a word), no merges."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return CLIPTokenizer.from_pretrained(folder)


def _models(seed: int = 3):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                        block_out_channels=(8,) * 5, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                        sample_size=256)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=52,
                                        eos_token_id=53, pad_token_id=53))
    return unet.eval(), vae.eval(), text.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(folder, unet, vae, text encoder, tokenizer): a pipeline folder in save_pretrained's layout."""
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    unet, vae, text = _models()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tok = _tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    return folder, unet, vae, text, tok


def _reference(pipeline, x, t=0, prompt="image classification", blocks=("mid",)):
    """diffusers' own passes: ``vae.encode(x).latent_dist.mean`` x scaling; the whole UNet forward
    with hooks catching the blocks' outputs; GroupNorm (32 groups, no affine), spatial mean."""
    _, unet, vae, text, tok = pipeline
    seen = {}
    hooks = [unet.mid_block.register_forward_hook(lambda m, a, out: seen.__setitem__("mid", out))]
    for i, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"down{i}", out[0])))
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.inference_mode():
        latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        context = text(input_ids=ids).last_hidden_state.expand(len(x), -1, -1)
        unet(latent, torch.tensor(t), encoder_hidden_states=context)
    for h in hooks:
        h.remove()
    norm = lambda y: torch.nn.GroupNorm(32, y.shape[1], affine=False)(y).mean(dim=(2, 3))  # noqa: E731
    return torch.cat([norm(seen[b]) for b in blocks], dim=1)


def _images(n=2, seed=0):
    return torch.rand(n, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_features_equal_diffusers_own_forward_and_preprocessing_is_bobs(pipeline):
    folder = pipeline[0]
    bb = load_backbone(f"diffusers:{folder}")
    assert bb.feature_dim == 64 and not bb.has_logits and bb.num_classes == 0
    assert "pretrained weights from directory" in bb.weights_note and "safetensors" in bb.weights_note
    assert bb.preprocess == PREPROCESS and bb.preprocess.size == (256, 256)
    assert bb.preprocess.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)) \
        .flatten().tolist() == [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    x = _images()
    with torch.inference_mode():
        feats, logits = bb.forward(x)
    assert feats.shape == (2, 64) and logits is None
    torch.testing.assert_close(feats, _reference(pipeline, x), rtol=1e-4, atol=1e-4)
    info = bb.describe()["diffusion"]
    assert info == {"timestep": 0, "prompt": "image classification", "pool": ["mid"], "group_norm_groups": 32,
                    "group_norm_eps": 1e-5, "latent_scaling": 0.18215}


def test_options_change_timestep_prompt_and_pooled_blocks(pipeline):
    folder = pipeline[0]
    name = f"diffusers:{folder},t=250,prompt=,pool=down0+mid"
    bb = load_backbone(name)
    assert bb.name == name and bb.feature_dim == 32 + 64
    assert bb.describe()["diffusion"]["pool"] == ["down0", "mid"] and bb.describe()["diffusion"]["prompt"] == ""
    x = _images(seed=1)
    with torch.inference_mode():
        feats = bb.forward(x)[0]
        default = load_backbone(f"diffusers:{folder}").forward(x)[0]
    torch.testing.assert_close(feats, _reference(pipeline, x, 250, "", ("down0", "mid")), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(feats[:, 32:], default, atol=1e-3)
    only_down = load_backbone(f"diffusers:{folder},pool=down1")
    assert only_down.model.mid_block is None and only_down.feature_dim == 64
    with torch.inference_mode():
        torch.testing.assert_close(only_down.forward(x)[0], _reference(pipeline, x, blocks=("down1",)),
                                   rtol=1e-4, atol=1e-4)


def test_names_are_canonical_and_checked(pipeline):
    folder = pipeline[0]
    assert parse_id("CompVis/stable-diffusion-v1-4,t=100,prompt=a+photo")[1].prompt == "a photo"
    for bad, match in [(",t=0", "write this backbone as"), (",pool=mid+down0", "UNet order"),
                       (",prompt=a%20b", "prompt=a\\+b"), (",step=3", "no option"), (",pool=up1", "not blocks"),
                       (",prompt=,t=5", "write this backbone as")]:
        with pytest.raises(BackboneNotFound, match=match):
            resolve(f"diffusers:{folder}{bad}")
    with pytest.raises(BackboneNotFound, match="down0..down1 and mid"):
        load_backbone(f"diffusers:{folder},pool=down2")
    with pytest.raises(BackboneNotFound, match="timesteps 0..999"):
        load_backbone(f"diffusers:{folder},t=1000")
    with pytest.raises(WeightsError, match="@random"):
        load_backbone(f"diffusers:{folder}@local")
    with pytest.raises(WeightsError, match="single file"):
        resolve(f"diffusers:{folder / 'model_index.json'}")


def test_a_hub_repo_out_of_reach_fails_in_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="nobody/no-such-sd .*HF_HUB_OFFLINE is set.*offline\\?") as err:
        load_backbone("diffusers:nobody/no-such-sd,prompt=")
    assert "\n" not in str(err.value)


def test_random_init_is_seeded_and_not_the_pretrained_weights(pipeline):
    folder = pipeline[0]
    a, b = load_backbone(f"diffusers:{folder}@random"), load_backbone(f"diffusers:{folder}@random")
    assert a.weights_note.startswith("random init (torch seed 0)")
    assert a.weights_sha256 == b.weights_sha256 != load_backbone(f"diffusers:{folder}").weights_sha256
    x = _images(seed=2)
    with torch.inference_mode():
        torch.testing.assert_close(a.forward(x)[0], b.forward(x)[0], rtol=0, atol=0)


def test_extraction_records_the_options_and_resumes_to_the_same_cache(pipeline, tmp_path):
    folder = pipeline[0]
    name = f"diffusers:{folder}@random"
    photos = open_source("cifar10-mini", "train")
    killed, clean = str(tmp_path / "k.zarr"), str(tmp_path / "c.zarr")
    opts = dict(dataset="c", split="train", limit=N, workers=0, batch_size=2, chunk_rows=2)

    def stop(done: int, total: int) -> None:
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(name, photos, cache=killed, progress=stop, **opts)
    done = Cache(killed, mode="r").group(name, "c", "train").rows_done()
    assert 0 < done < N
    assert extract(name, photos, cache=killed, **opts).rows_written == N - done
    extract(name, photos, cache=clean, **opts)
    path = Cache(clean, mode="r").group(name, "c", "train").path
    a, b = zarr.open_group(killed, mode="r")[path], zarr.open_group(clean, mode="r")[path]
    for arr in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a[arr][:], b[arr][:])
    assert a.attrs["cache_key"] == b.attrs["cache_key"] and a.attrs["complete"]
    assert a["features"].shape == (N, 64)
    assert a.attrs["backbone_info"]["diffusion"]["prompt"] == "image classification"
    other = f"diffusers:{folder},t=500@random"
    extract(other, photos, cache=clean, **opts)
    g = Cache(clean, mode="r").group(other, "c", "train")
    assert g.path != path and g.attrs["backbone_info"]["diffusion"]["timestep"] == 500
    assert g.attrs["cache_key"] != b.attrs["cache_key"]


def test_pickles_and_custom_code_are_refused(pipeline, tmp_path):
    import shutil

    folder, unet = pipeline[0], pipeline[1]
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    shutil.rmtree(pickled / "unet")
    unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert any(p.suffix == ".bin" for p in (pickled / "unet").iterdir())
    with pytest.raises(WeightsError, match="only pickled weights .*never unpickles"):
        load_backbone(f"diffusers:{pickled}")
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    index = json.loads((custom / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, "unet": ["my_unet", "MyUNet"]}))
    with pytest.raises(WeightsError, match="needs custom code"):
        load_backbone(f"diffusers:{custom}")
    with pytest.raises(WeightsError, match="no diffusers pipeline folder"):
        load_backbone(f"diffusers:{tmp_path}")


def test_tasks_run_on_the_cached_features(pipeline, tmp_path):
    """The feature goes through the Backbone contract, so the cache-reading tasks take it as any other."""
    import backbench

    name = f"diffusers:{pipeline[0]},prompt=@random"
    cache = str(tmp_path / "c.zarr")
    for split, n in (("train", 20), ("test", 10)):
        extract(name, open_source("cifar10-mini", split), cache=cache, dataset="c", split=split, limit=n,
                workers=0, batch_size=10)
    knn = backbench.knn(name, "c", train="train", eval="test", k=[1, 3], cache=cache)
    probe = backbench.probe(name, "c", train="train", eval="test", C=[1.0], cache=cache)
    for result in (knn, probe):
        assert result.record["backbone"] == name and 0.0 <= result.metrics["top1"] <= 1.0
