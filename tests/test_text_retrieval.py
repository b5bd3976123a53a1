"""Image-text retrieval: captioned sources, recall@k against CLIP_benchmark's computation,
open_clip random towers end to end (cached captions reused), the CLI and the battle."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import backbench
from backbench.errors import DataSourceError, NotApplicable
from backbench.extract.datasets import limit_source, open_source
from backbench.extract.run import extract
from backbench.probe.text_retrieval import text_retrieval_metrics
from backbench.store import Cache
from backbench.store.results import ResultsLog
from conftest import write_image

CLIP = "open_clip:ViT-S-32@random"
WORDS = ["cat", "dog", "eel", "fox", "owl", "yak"]


def clip_benchmark_recalls(images, texts, owner, k):
    """CLIP_benchmark's zeroshot_retrieval recall@k, in torch as it computes it."""
    I = torch.nn.functional.normalize(torch.as_tensor(images, dtype=torch.float64), dim=-1)
    T = torch.nn.functional.normalize(torch.as_tensor(texts, dtype=torch.float64), dim=-1)
    scores = T @ I.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(owner)] = True

    def recall(s, p):
        top = torch.topk(s, min(k, s.shape[1]), dim=1)[1]  # a k beyond the gallery: all of it
        return (torch.nn.functional.one_hot(top, s.shape[1]) * p[:, None, :]).sum((1, 2)) > 0

    return recall(scores.T, positive.T).double().mean().item(), recall(scores, positive).double().mean().item()


def test_recalls_equal_clip_benchmarks():
    rng = np.random.default_rng(0)
    images, owner = rng.normal(size=(30, 8)), np.repeat(np.arange(30), rng.integers(1, 4, 30))
    texts = images[owner] + rng.normal(scale=1.5, size=(len(owner), 8))
    metrics, out = text_retrieval_metrics(images, texts, owner, ks=[1, 5, 10])
    for k in (1, 5, 10):
        i2t, t2i = clip_benchmark_recalls(images, texts, owner, k)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert metrics["n_images"] == 30 and metrics["n_texts"] == len(owner)
    assert 0 < metrics["image_to_text_R@1"] < metrics["image_to_text_R@10"] <= 1
    assert metrics["mean_recall"] == pytest.approx(np.mean([metrics[f"{d}_R@{k}"] for d in ("image_to_text",
                                                             "text_to_image") for k in (1, 5, 10)]))
    assert out["i2t_rank"].shape == (30,) and out["t2i_rank"].shape == (len(owner),)


def _captioned(root):
    rows = []
    for i, w in enumerate(WORDS):
        write_image(root / "img" / f"{w}.png", seed=i)
        rows.append({"image": f"img/{w}.png", "caption": [f"a photo of a {w}.", f"a {w} outdoors"] if i % 2
                     else f"a photo of a {w}."})
    (root / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "caps.jsonl"


def test_caption_sources(tmp_path):
    jsonl = _captioned(tmp_path)
    src = open_source(f"captions:{jsonl}", "test")
    assert src.ids[:2] == ["img/cat.png", "img/dog.png"] and src.classes == ["image"]
    assert src.captions[1] == ["a photo of a dog.", "a dog outdoors"] and len(src.load(0).size) == 2
    f = tmp_path / "caps.csv"
    f.write_text("path,c1,c2\nimg/cat.png,a cat,\nimg/dog.png,a dog,one more dog\nimg/cat.png,the cat again,\n")
    csv = open_source(f"csv:{f}?caption=c1,c2", "test")
    assert csv.ids == ["img/cat.png", "img/dog.png"]
    assert csv.captions == [["a cat", "the cat again"], ["a dog", "one more dog"]]
    assert csv.spec.endswith("?caption=c1,c2")
    other = tmp_path / "other.csv"
    other.write_text("path,c1,c2\nimg/cat.png,a cat,\nimg/dog.png,a dog,a different dog\nimg/cat.png,the cat again,\n")
    assert open_source(f"csv:{other}?caption=c1,c2", "test").fingerprint() != csv.fingerprint()  # captions count
    assert limit_source(csv, 1).fingerprint() != csv.fingerprint()
    with pytest.raises(DataSourceError, match="lacks column"):
        open_source(f"csv:{f}?caption=nope", "test")
    (tmp_path / "bad.jsonl").write_text('{"image": "img/cat.png"}\n')
    with pytest.raises(DataSourceError, match="caption"):
        open_source(f"captions:{tmp_path / 'bad.jsonl'}", "test")


@pytest.fixture(scope="module")
def captioned_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr")
    jsonl = _captioned(root)
    path = str(root / "f.zarr")
    extract(CLIP, f"captions:{jsonl}", cache=path, dataset="caps", split="test", workers=0, dtype="float32",
            device="cpu")
    extract(CLIP, "digits", cache=path, dataset="digits", split="test", workers=0, limit=8, device="cpu")
    return path


def test_open_clip_recalls_equal_a_hand_computation(captioned_cache):
    import open_clip

    result = backbench.text_retrieval(CLIP, "caps", split="test", cache=captioned_cache, device="cpu")
    record = result.record
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    captions = [c for i, w in enumerate(WORDS) for c in ([f"a photo of a {w}.", f"a {w} outdoors"] if i % 2
                                                         else [f"a photo of a {w}."])]
    owner = [i for i, w in enumerate(WORDS) for _ in (range(2) if i % 2 else range(1))]
    with torch.inference_mode():
        T = model.encode_text(open_clip.get_tokenizer("ViT-S-32")(captions)).numpy()
    X = Cache(captioned_cache).group(CLIP, "caps", "test").read_labeled(dtype=np.float32)[0]
    for k in (1, 5, 10):
        i2t, t2i = clip_benchmark_recalls(X, T, owner, k)
        assert record["metrics"][f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert record["metrics"][f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert record["metrics"]["n_texts"] == 9 and record["metrics"]["image_to_text_R@10"] == 1.0
    out = ResultsLog(Cache(captioned_cache)).outcomes(record)
    assert out["t2i_rank"].shape == (9,) and out["i2t_rank"].shape == (6,)


def test_cached_captions_are_reused_without_the_tower_or_the_source(captioned_cache, monkeypatch):
    first = backbench.text_retrieval(CLIP, "caps", split="test", ks=[1, 2], cache=captioned_cache, device="cpu")
    text = sys.modules["backbench.extract.text"]

    def no_tower(*args):
        raise AssertionError("the text tower was loaded although the captions are cached")

    monkeypatch.setattr(text, "load_text_tower", no_tower)
    again = backbench.text_retrieval(CLIP, "caps", split="test", ks=[1, 2], cache=captioned_cache, device="cpu",
                                     force=True)
    assert again.record["metrics"] == first.record["metrics"]


def test_cli_and_not_applicable(captioned_cache, run_cli):
    code, out, err = run_cli("retrieve", "--text", "-b", CLIP, "-d", "caps", "--query", "test", "--gallery", "test",
                             "--cache", captioned_cache, "--device", "cpu")
    assert code == 0, err
    assert "image_to_text" in out and "text_to_image" in out
    code, out, err = run_cli("retrieve", "--text", "-b", CLIP, "-d", "caps", "--query", "test", "--gallery", "x",
                             "--cache", captioned_cache)
    assert code == 2 and "same split" in err
    with pytest.raises(NotApplicable, match="has no captions"):
        backbench.text_retrieval(CLIP, "digits", split="test", cache=captioned_cache)
    with pytest.raises(NotApplicable, match="no text tower"):
        backbench.text_retrieval("timm:test_resnet@random", "caps", split="test", cache=captioned_cache)


def test_battle_runs_text_retrieval_and_shows_na(tmp_path):
    from backbench.battle.config import parse_config
    from backbench.battle.run import run_battle
    from backbench.report.leaderboard import build

    jsonl = _captioned(tmp_path)
    raw = {"backbones": [CLIP, "timm:test_resnet@random"], "workers": 0, "device": "cpu",
           "datasets": {"caps": {"splits": {"test": f"captions:{jsonl}"}, "train": "test", "eval": "test"}},
           "tasks": {"text-retrieval": {"ks": [1, 5]}}}
    cache = Cache(str(tmp_path / "b.zarr"))
    summary = run_battle(parse_config(raw), cache)
    assert not summary.failed, [(r.cell.label, r.message) for r in summary.failed]
    cells = {r.cell.backbone: r for r in summary.results if r.cell.stage == "text-retrieval"}
    assert cells[CLIP].status == "done" and cells["timm:test_resnet@random"].status == "n/a"
    board = build(ResultsLog(cache).records())
    assert board.columns == ["text-retrieval:caps"] and board.backbones == [CLIP]


def test_a_source_gone_before_its_captions_were_cached_says_so(tmp_path):
    from backbench.errors import ProbeInputError

    jsonl = _captioned(tmp_path)
    path = str(tmp_path / "g.zarr")
    extract("timm:test_resnet@random", f"captions:{jsonl}", cache=path, dataset="caps", split="test", workers=0,
            device="cpu")
    group = Cache(path).group("timm:test_resnet@random", "caps", "test")
    assert group.attrs["source"] == f"captions:{jsonl.absolute()}"
    jsonl.unlink()
    from backbench.probe.text_retrieval import _captions

    with pytest.raises(ProbeInputError, match="cannot be opened now"):
        _captions(group, ["img/cat.png"])


def test_the_leaderboard_shows_na_where_the_task_does_not_apply(captioned_cache, tmp_path):
    """A backbone without a text tower beside one with: its zero-shot cell is n/a, not missing."""
    from backbench.report.leaderboard import build
    from backbench.report.render import to_markdown

    extract("timm:test_resnet@random", "digits", cache=captioned_cache, dataset="digits", split="test", workers=0,
            limit=8, device="cpu")
    backbench.zeroshot(CLIP, "digits", eval="test", templates=["a {c}"], cache=captioned_cache, device="cpu")
    with pytest.raises(NotApplicable):
        backbench.zeroshot("timm:test_resnet@random", "digits", eval="test", cache=captioned_cache)
    backbench.retrieve("timm:test_resnet@random", "digits", query="test", gallery="test", cache=captioned_cache,
                       device="cpu")  # a row of its own on the board
    board = build(ResultsLog(Cache(captioned_cache)).records())
    row = {r["backbone"]: r for r in board.rows()}["timm:test_resnet@random"]
    assert row["zeroshot:digits"] == "n/a" and "zeroshot" not in row["missing"]
    assert ("timm:test_resnet@random", "zeroshot:digits") not in board.missing
    assert "n/a cells" in to_markdown(board)
    assert {"backbone": "timm:test_resnet@random", "column": "zeroshot:digits"} in \
        [{k: v for k, v in e.items() if k != "reason"} for e in board.to_dict()["not_applicable"]]
