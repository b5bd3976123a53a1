"""Issue 18, item 7: code shipped with a model never runs, and no weights file is unpickled.

Real model folders (``save_pretrained`` of small config-built models) whose ``auto_map`` points
to a Python file that writes a marker file when it is imported; a real pickle that writes a
marker when it is unpickled, in the torch hub cache where torchvision looks for its weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import load_backbone, resolve


def _vit(folder: Path) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(4)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).eval()
    model.save_pretrained(folder)
    return model


def _custom_code(folder: Path, marker: Path) -> None:
    """``evil.py``: importing it writes ``marker``; it defines the classes ``auto_map`` names."""
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import ViTConfig, ViTModel, ViTImageProcessor\n"
        "class EvilConfig(ViTConfig):\n    model_type = 'evilvit'\n"
        "class EvilModel(ViTModel):\n    config_class = EvilConfig\n"
        "class EvilProc(ViTImageProcessor):\n    pass\n"
    )


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def custom_model(tmp_path) -> tuple[Path, Path]:
    folder, marker = tmp_path / "custom", tmp_path / "marker"
    _vit(folder)
    _custom_code(folder, marker)
    _edit_json(folder / "config.json", model_type="evilvit",
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    return folder, marker


def test_cli_refuses_custom_code_without_a_prompt_even_when_stdin_says_yes(tmp_path, custom_model):
    folder, marker = custom_model
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "backbench", "extract", f"hf:{folder}", "--data", "digits", "--dataset", "digits",
         "--split", "train", "--limit", "8", "--device", "cpu", "--cache", str(tmp_path / "c.zarr")],
        input="y\n", capture_output=True, text=True, env=env, timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "[y/N]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert lines[0].startswith(f"error: hf:{folder} needs custom code (evil.EvilConfig, evil.EvilModel in directory ")
    assert "backbench never runs code from a model repo" in lines[0]
    assert not marker.exists()  # evil.py was never imported
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("weights", ["", "@random"])
def test_api_refuses_custom_code(custom_model, weights):
    folder, marker = custom_model
    with pytest.raises(WeightsError, match="needs custom code"):
        load_backbone(f"hf:{folder}{weights}")
    assert not marker.exists()


def test_custom_image_processor_is_refused_not_replaced_by_defaults(tmp_path):
    # config and model are transformers' own; only the image processor is custom code
    from transformers import ViTImageProcessor

    folder, marker = tmp_path / "proc", tmp_path / "marker"
    _vit(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    _custom_code(folder, marker)
    _edit_json(folder / "preprocessor_config.json", image_processor_type="EvilProc",
               auto_map={"AutoImageProcessor": "evil.EvilProc"})
    with pytest.raises(WeightsError, match=r"needs custom code \(evil\.EvilProc in directory"):
        load_backbone(f"hf:{folder}")
    assert not marker.exists()


def test_builtin_model_type_with_an_auto_map_loads_transformers_own_class(tmp_path):
    # transformers has the class itself: it is used, and the repo's code is not run
    folder, marker = tmp_path / "vit", tmp_path / "marker"
    model = _vit(folder)
    _custom_code(folder, marker)
    _edit_json(folder / "config.json", auto_map={"AutoModel": "evil.EvilModel"})
    bb = load_backbone(f"hf:{folder}")
    assert not marker.exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], model(pixel_values=x).pooler_output)


def test_weights_that_leave_tensors_random_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vit"
    _vit(folder)
    sd = load_file(str(folder / "model.safetensors"))
    dropped = "encoder.layer.0.attention.attention.query.weight"
    key = next(k for k in sd if k.endswith(dropped))
    del sd[key]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 tensor\(s\) of ViTModel are not in the weights .*would be random"):
        load_backbone(f"hf:{folder}")


def test_torchvision_hub_file_is_never_unpickled(tmp_path, monkeypatch):
    # torch.hub loads torchvision's weights with weights_only=False; backbench forces weights-only
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"conv1.weight": Payload()}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(WeightsError, match=r"^cannot get torchvision weights ResNet18_Weights\.IMAGENET1K_V1 \("):
        load_backbone("torchvision:resnet18")
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # forced for that load only


@pytest.mark.parametrize("name", ["timm:hf-hub:someone/model", "open_clip:hf-hub:someone/model"])
def test_hub_config_names_are_not_backbone_ids(name):
    # timm and open_clip build hf-hub: models from a remote config; backbench takes built-in architectures only
    with pytest.raises(BackboneNotFound):
        resolve(name)
