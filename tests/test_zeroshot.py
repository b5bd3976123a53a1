"""Zero-shot classification: open_clip random towers against a hand computation with open_clip's
own model and tokenizer, a tiny Hugging Face CLIP from a config, the cached text group reused,
and a backbone without a text tower shown as n/a in a battle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import backbench
from backbench.errors import DataSourceError, NotApplicable
from backbench.extract.run import extract
from backbench.extract.text import class_embeddings, default_templates, read_templates, text_group_path
from backbench.probe.zeroshot import zeroshot_logits, zeroshot_metrics
from backbench.store import Cache
from backbench.store.group import FeatureGroup
from backbench.store.results import ResultsLog

CLIP = "open_clip:ViT-S-32@random"
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c}"]


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    """The conftest's 3-class image folder, extracted once with random open_clip ViT-S-32 towers."""
    from conftest import write_image

    root = tmp_path_factory.mktemp("zs")
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            write_image(root / "images" / name / f"{i}.png", seed=10 * c + i)
    path = str(root / "f.zarr")
    extract(CLIP, f"imagefolder:{root / 'images'}", cache=path, dataset="toy", split="test", workers=0,
            dtype="float32", device="cpu")
    return path


def _text_group(cache_path: str, record: dict) -> np.ndarray:
    node = Cache(cache_path).root[text_group_path(record["backbone"], record["text_group"])]
    return FeatureGroup(node).check().read_labeled(dtype=np.float32)[0]


def test_logits_equal_open_clips_own_computation(clip_cache):
    import open_clip

    result = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES, cache=clip_cache, device="cpu")
    record = result.record
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    with torch.inference_mode():  # CLIP_benchmark's zero_shot_classifier, by hand
        weights = []
        for c in ["cat", "dog", "eel"]:
            e = torch.nn.functional.normalize(model.encode_text(tokenizer([t.format(c=c) for t in TEMPLATES])), dim=-1)
            weights.append(e.mean(0) / e.mean(0).norm())
        W = torch.stack(weights).double()
    text = _text_group(clip_cache, record)
    np.testing.assert_allclose(text, W.numpy(), atol=1e-5)
    group = Cache(clip_cache).group(CLIP, "toy", "test")
    X, y = group.read_labeled(dtype=np.float32)
    images = torch.nn.functional.normalize(torch.from_numpy(X).double(), dim=-1)
    hand = (images @ W.T).numpy()
    np.testing.assert_allclose(zeroshot_logits(X, text), hand, atol=1e-5)
    order = np.argsort(-hand, axis=1)
    assert record["metrics"]["top1"] == pytest.approx(float((order[:, 0] == y).mean()))
    assert record["metrics"]["top5"] == 1.0  # 3 classes: top-5 is top-3
    assert record["params"] == {"templates": TEMPLATES, "n_templates": 3}
    out = ResultsLog(Cache(clip_cache)).outcomes(record)
    np.testing.assert_array_equal(out["predicted"], order[:, 0])
    np.testing.assert_array_equal(out["correct"], order[:, 0] == y)


def test_text_group_is_reused_and_keyed_on_templates(clip_cache, monkeypatch):
    import sys

    text = sys.modules["backbench.extract.text"]  # (backbench.extract is the API function)

    first = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES[:2], cache=clip_cache, device="cpu")
    assert not first.reused[0]

    def no_tower(*args):
        raise AssertionError("the text tower was loaded although its embeddings are cached")

    monkeypatch.setattr(text, "load_text_tower", no_tower)
    again = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES[:2], cache=clip_cache, device="cpu",
                               force=True)  # recomputed from the cached text group, the tower never loaded
    assert again.record["metrics"] == first.record["metrics"]
    assert again.record["groups"]["text"] == first.record["groups"]["text"]
    with pytest.raises(AssertionError, match="text tower was loaded"):  # other templates: another group
        backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES[:1], cache=clip_cache, device="cpu")
    # text groups stay out of the backbone/dataset/split tree
    assert all(g.dataset == "toy" for g in Cache(clip_cache).groups())


def test_default_templates_are_clips_80():
    t = default_templates()
    assert len(t) == 80 and t[0] == "a bad photo of a {c}." and all("{c}" in s for s in t)
    assert len(default_templates("simple")) == 7
    with pytest.raises(DataSourceError, match="openai or simple"):
        default_templates("other")


def test_templates_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\na photo of a {c}.\n\n{c}, a sketch\n")
    assert read_templates(f) == ["a photo of a {c}.", "{c}, a sketch"]
    f.write_text("a photo\n")
    with pytest.raises(DataSourceError, match="no \\{c\\}"):
        read_templates(f)


def test_metrics_against_hand_counts():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.3]])
    y = np.array([0, 1, 1, 2])
    metrics, out = zeroshot_metrics(logits, y)
    assert metrics["top1"] == 0.75 and metrics["top5"] == 1.0 and metrics["n"] == 4
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    np.testing.assert_array_equal(out["predicted"], [0, 1, 0, 2])
    E = np.random.default_rng(0).normal(size=(6, 4))
    C = class_embeddings(E, 2)
    n = E / np.linalg.norm(E, axis=1, keepdims=True)
    ref = np.stack([n[:3].mean(0), n[3:].mean(0)])
    np.testing.assert_allclose(C, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def _tiny_hf_clip(path, **tokenizer_options):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["<bos>", "<eos>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "eel", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 0),
                                                                                               ("<eos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>", model_max_length=16, **tokenizer_options)
    torch.manual_seed(3)
    cfg = CLIPConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64),
                     text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=len(words), bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, max_position_embeddings=16),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def test_tiny_hf_clip(tmp_path, imagefolder):
    model, fast = _tiny_hf_clip(tmp_path / "clip")
    name = f"hf:{tmp_path / 'clip'}"
    path = str(tmp_path / "f.zarr")
    extract(name, f"imagefolder:{imagefolder}", cache=path, dataset="toy", split="test", workers=0, dtype="float32",
            device="cpu")
    record = backbench.zeroshot(name, "toy", eval="test", templates=["a photo of the {c} ."], cache=path,
                                device="cpu").record
    with torch.inference_mode():
        tokens = fast([f"a photo of the {c} ." for c in ["cat", "dog", "eel"]], padding="max_length", max_length=16,
                      return_tensors="pt")
        ref = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    W = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(_text_group(path, record), W, atol=1e-5)
    X, y = Cache(path).group(name, "toy", "test").read_labeled(dtype=np.float32)
    top1 = float((np.argmax(zeroshot_logits(X, W), axis=1) == y).mean())
    assert record["metrics"]["top1"] == pytest.approx(top1) and record["metrics"]["n"] == 15


def test_no_text_tower_is_not_applicable_and_na_in_a_battle(tmp_path, imagefolder, run_cli):
    from backbench.battle.config import parse_config
    from backbench.battle.run import run_battle
    from backbench.report.leaderboard import build

    cache = Cache(str(tmp_path / "b.zarr"))
    with pytest.raises(NotApplicable, match="no text tower"):  # said before any model or group is read
        backbench.zeroshot("timm:test_resnet@random", "toy", eval="test", cache=cache)
    raw = {"backbones": ["timm:test_resnet@random", "timm:test_vit@random"], "workers": 0, "device": "cpu",
           "datasets": {"toy": {"splits": {"train": f"imagefolder:{imagefolder}",
                                           "test": f"imagefolder:{imagefolder}"}}},
           "tasks": {"zeroshot": {"templates": ["a photo of a {c}."]}, "knn": {"k": [3]}}}
    summary = run_battle(parse_config(raw), cache)
    assert not summary.failed, [(r.cell.label, r.message) for r in summary.failed]
    na = [r for r in summary.results if r.cell.stage == "zeroshot"]
    assert len(na) == 2 and {r.status for r in na} == {"n/a"} and all("no text tower" in r.message for r in na)
    board = build(ResultsLog(cache).records())
    assert board.columns == ["knn:toy"]  # no backbone has zero-shot: no column to show n/a in
    config = tmp_path / "b.toml"  # the command: exit 0, the n/a cells listed with their reason
    config.write_text(f'backbones = ["timm:test_resnet@random", "timm:test_vit@random"]\nworkers = 0\n'
                      f'[datasets.toy.splits]\ntrain = "imagefolder:{imagefolder}"\ntest = "imagefolder:{imagefolder}"\n'
                      f'[tasks.zeroshot]\ntemplates = ["a photo of a {{c}}."]\n[tasks.knn]\nk = [3]\n')
    code, out, err = run_cli("battle", str(config), "--cache", cache.path, "--device", "cpu")
    assert code == 0, err
    assert "2 n/a" in out and "n/a cells" in out and "no text tower" in out


def test_cli_zeroshot_with_a_templates_file(clip_cache, tmp_path, run_cli):
    import json

    f = tmp_path / "t.txt"
    f.write_text("a photo of a {c}.\nart of a {c}\n")
    code, out, err = run_cli("zeroshot", "-b", CLIP, "-d", "toy", "--eval", "test", "--templates", str(f),
                             "--cache", clip_cache, "--device", "cpu")
    assert code == 0, err
    assert "top1" in out and "mean_per_class_recall" in out
    code, out, err = run_cli("zeroshot", "-b", CLIP, "-d", "toy", "--eval", "test", "--templates", str(f),
                             "--cache", clip_cache, "--json")
    record = json.loads(out)
    assert code == 0 and record["reused"] and record["params"]["templates"] == ["a photo of a {c}.", "art of a {c}"]
    code, out, err = run_cli("zeroshot", "-b", "timm:test_resnet@random", "-d", "toy", "--eval", "test",
                             "--cache", clip_cache)
    assert code == 1 and "no text tower" in err


def test_tiny_hf_siglip(tmp_path, imagefolder):
    """SigLIP: the pooled head output is the image embedding; texts padded to the maximum length."""
    from transformers import SiglipConfig, SiglipModel

    _, fast = _tiny_hf_clip(tmp_path / "clip", model_input_names=["input_ids"])  # no attention mask, as SigLIP's
    torch.manual_seed(4)
    cfg = SiglipConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64),
                       text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=11, max_position_embeddings=16,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=1))
    model = SiglipModel(cfg).eval()
    model.save_pretrained(tmp_path / "siglip")
    fast.save_pretrained(tmp_path / "siglip")
    name = f"hf:{tmp_path / 'siglip'}"
    path = str(tmp_path / "s.zarr")
    extract(name, f"imagefolder:{imagefolder}", cache=path, dataset="toy", split="test", workers=0, dtype="float32",
            device="cpu")
    record = backbench.zeroshot(name, "toy", eval="test", templates=["a photo of the {c} ."], cache=path,
                                device="cpu").record
    with torch.inference_mode():
        tokens = fast([f"a photo of the {c} ." for c in ["cat", "dog", "eel"]], padding="max_length", max_length=16,
                      return_tensors="pt")
        ref = model.get_text_features(input_ids=tokens["input_ids"])
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        x = torch.randn(2, 3, 32, 32)
        img = model.get_image_features(pixel_values=x)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
    np.testing.assert_allclose(_text_group(path, record), torch.nn.functional.normalize(ref, dim=-1).numpy(),
                               atol=1e-5)
    from backbench.extract.backbones import load_backbone

    with torch.inference_mode():
        torch.testing.assert_close(load_backbone(name).forward(x)[0], img)  # the cached kind is the embedding


def test_classnames_replace_the_stored_names(clip_cache, tmp_path, run_cli):
    from backbench.errors import ProbeInputError

    named = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES[:1], classnames=["kitten", "puppy", "fish"],
                               cache=clip_cache, device="cpu").record
    plain = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES[:1], cache=clip_cache, device="cpu").record
    assert named["params"]["classnames"] == ["kitten", "puppy", "fish"] and "classnames" not in plain["params"]
    assert named["groups"]["text"] != plain["groups"]["text"] and named["key"] != plain["key"]
    with pytest.raises(ProbeInputError, match="3 classes but 2 class names"):
        backbench.zeroshot(CLIP, "toy", eval="test", classnames=["a", "b"], cache=clip_cache)
    f = tmp_path / "names.txt"
    f.write_text("kitten\npuppy\nfish\n")
    code, out, err = run_cli("zeroshot", "-b", CLIP, "-d", "toy", "--eval", "test", "--templates", "simple",
                             "--classnames", str(f), "--cache", clip_cache, "--device", "cpu", "--json")
    assert code == 0, err
    import json

    assert json.loads(out)["params"]["classnames"] == ["kitten", "puppy", "fish"]
