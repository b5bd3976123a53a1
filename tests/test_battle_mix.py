"""One battle config mixing backbone sources (timm, torchvision, a local transformers model),
feature kinds (NAME#cls) and data formats (digits, WebDataset shards)."""

from __future__ import annotations

import numpy as np

from backbench.report.leaderboard import build
from backbench.store.results import ResultsLog
from backbench.store import Cache
from test_datasets_wds import write_shards


def _tiny_hf_vit(folder):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def test_battle_mixes_sources_kinds_and_formats(tmp_path, imagefolder, run_cli):
    _tiny_hf_vit(tmp_path / "vit")
    write_shards(imagefolder, tmp_path / "shards", per_shard=5)
    shards = f"wds:{tmp_path / 'shards'}/shard-{{000000..000002}}.tar"
    backbones = ["timm:test_vit@random", "timm:test_vit@random#cls", "torchvision:mobilenet_v3_small@random",
                 f"hf:{tmp_path / 'vit'}"]
    cfg = tmp_path / "mix.toml"
    cfg.write_text("\n".join([
        "backbones = [" + ", ".join(f'"{b}"' for b in backbones) + "]",
        "workers = 0",
        "[datasets.digits]", 'source = "digits"', 'splits = ["train", "test"]', "limit = 60",
        "[datasets.shapes]", 'train = "train"', 'eval = "test"',
        f'splits = {{ train = "{shards}", test = "{shards}" }}',
        "[tasks.probe]", "C = [1.0]", "[tasks.knn]", "k = [3]",
    ]))
    cache = str(tmp_path / "mix.zarr")
    code, out, err = run_cli("battle", str(cfg), "--cache", cache)
    assert code == 0, out + err
    lb = build(ResultsLog(Cache(cache, mode="r")).records())
    assert sorted(lb.backbones) == sorted(backbones)
    assert sorted(lb.columns) == ["knn:digits", "knn:shapes", "probe:digits", "probe:shapes"]
    assert not np.isnan(lb.values).any()
