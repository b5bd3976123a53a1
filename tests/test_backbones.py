"""Backbone names and the registry: parsing, typos with suggestions, missing weights files."""

from __future__ import annotations

import pytest

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import BackboneSpec, resolve


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("timm:resnet18@random", ("timm", "resnet18", "random")),
        ("timm:vit_base_patch16_224.augreg_in21k", ("timm", "vit_base_patch16_224.augreg_in21k", None)),
        ("open_clip:ViT-B-32/openai", ("open_clip", "ViT-B-32/openai", None)),
        ("timm:resnet18@/tmp/w.safetensors", ("timm", "resnet18", "/tmp/w.safetensors")),
    ],
)
def test_parse_names(name, parsed):
    spec = BackboneSpec.parse(name)
    assert (spec.source, spec.id, spec.weights) == parsed
    assert str(spec) == name


@pytest.mark.parametrize("name", ["resnet18", "timm:", ":resnet18", "timm:resnet18@"])
def test_malformed_names_say_the_syntax(name):
    with pytest.raises(BackboneNotFound, match="SOURCE:ID|@"):
        BackboneSpec.parse(name)


def test_typo_suggests_close_names():
    with pytest.raises(BackboneNotFound, match="did you mean timm:test_resnet"):
        resolve("timm:test_resnt@random")
    with pytest.raises(BackboneNotFound, match="did you mean timm:"):
        resolve("tim:test_resnet@random")


def test_missing_weights_file():
    with pytest.raises(WeightsError, match="does not exist"):
        resolve("timm:test_resnet@/nonexistent/w.pth")
