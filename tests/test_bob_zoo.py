"""The BoB zoo preset: its data file, every name resolvable, the battle's expansion, the CLI."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm

from backbench.battle.config import ConfigError, parse_config
from backbench.extract.backbones import SOURCES, BackboneSpec, ensure_sources, resolve
from backbench.extract.backbones.zoo import FAMILIES, PresetError, expand, load_preset, preset_names

ENTRIES = load_preset("bob")
DATASETS = {"d": {"source": "digits", "splits": ["train", "test"]}}


def test_every_bob_config_is_there_once_with_a_name_or_a_reason():
    bob = [e.bob for e in ENTRIES if e.bob]
    assert len(bob) == len(set(bob)) == 27  # one per backbone of BoB's model_configs (its _ft configs)
    assert {"resnet50_im1k", "convnext_b_im21k", "vit_base_patch16_224_mae", "resnet50_clip", "sd_256",
            "midas_swin2_base_384", "vit_small_224_moco"} <= set(bob)
    assert {e.family for e in ENTRIES} == set(FAMILIES)
    for e in ENTRIES:
        assert bool(e.name) != bool(e.missing), e
    assert [e.name for e in ENTRIES if e.family == "random-init"] and \
        all(BackboneSpec.parse(e.name).weights == "random" for e in ENTRIES if e.family == "random-init")


@pytest.mark.parametrize("name", [e.name for e in ENTRIES if e.name])
def test_every_name_resolves_without_loading_weights(name):
    ensure_sources()
    spec = BackboneSpec.parse(name)
    if spec.source not in SOURCES:
        pytest.skip(f"the {spec.source} source is not registered in this checkout")
    resolve(name)  # source and model known, nothing downloaded


def test_hub_names_are_in_the_libraries_pretrained_lists():
    pretrained_timm = set(timm.list_pretrained())
    pretrained_clip = {f"{a}/{t}" for a, t in open_clip.list_pretrained()}
    for e in ENTRIES:
        spec = BackboneSpec.parse(e.name) if e.name else None
        if spec is None or spec.weights == "random":
            continue
        if spec.source == "timm":
            assert spec.id in pretrained_timm, e.name
        elif spec.source == "open_clip":
            assert spec.id in pretrained_clip, e.name


def test_battle_config_expands_the_preset():
    names = preset_names("bob")
    by_key = parse_config({"preset": "bob", "datasets": DATASETS})
    by_item = parse_config({"backbones": ["timm:test_vit@random", "@bob"], "datasets": DATASETS})
    assert by_key.backbones == names and len(names) == len(set(names)) > 20
    assert by_item.backbones == ["timm:test_vit@random", *names]
    both = parse_config({"preset": "bob", "backbones": ["timm:test_vit@random", names[0]], "datasets": DATASETS})
    assert both.backbones == [*names, "timm:test_vit@random"]  # the preset first, duplicates once
    assert expand(["@bob"]) == names


def test_unknown_preset_is_one_config_problem():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: bob"):
        parse_config({"preset": "nope", "datasets": DATASETS})
    with pytest.raises(ConfigError, match="unknown preset 'zoo'"):
        parse_config({"backbones": ["@zoo"], "datasets": DATASETS})
    with pytest.raises(PresetError):
        load_preset("zoo")


def test_cli_lists_the_preset(run_cli):
    code, out, err = run_cli("models", "--preset", "bob", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == len(ENTRIES) and [r["name"] for r in rows] == [e.name for e in ENTRIES]
    moco = next(r for r in rows if r["bob"] == "vit_small_224_moco")
    assert moco["name"] is None and "12 heads" in moco["missing"] and moco["on_machine"] is False
    assert all(r["on_machine"] for r in rows if r["family"] == "random-init")
    code, out, _ = run_cli("models", "--preset", "bob")
    assert code == 0 and "resnet50_dino" in out and "missing:" in out and "@bob" in out
    code, _, err = run_cli("models", "--preset", "zoo")
    assert code == 2 and "unknown preset 'zoo'" in err
