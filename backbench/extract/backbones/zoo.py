"""Presets: named lists of backbones kept as data in the package (``bob_zoo.toml``: the Battle of
the Backbones zoo by today's hub names, with the entries no hub has and why).

A battle config expands ``preset = "bob"`` or ``backbones = ["@bob"]`` to :func:`preset_names`;
``backbench models --preset bob`` shows :func:`preset_rows`. Reading a preset needs only the
standard library; whether an entry's weights are on this machine asks its library (lazily).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from backbench.errors import BackbenchError
from backbench.extract.backbones.hub import hub_cached

PRESETS = {"bob": "bob_zoo.toml"}  # preset name -> data file beside this module
FAMILIES = ("supervised", "self-supervised", "vision-language", "diffusion", "depth", "random-init")


class PresetError(BackbenchError, ValueError):
    """An unknown preset name, or a preset file that does not read as one."""

    exit_code = 2


@dataclass(frozen=True)
class ZooEntry:
    """One backbone of a preset: its name in the paper's code, family, architecture, pretraining,
    the backbench name (None when no hub has it), why it is missing, and a note."""

    bob: str
    family: str
    arch: str
    pretraining: str
    name: str | None = None
    missing: str = ""
    note: str = ""


def load_preset(preset: str = "bob") -> list[ZooEntry]:
    """The entries of ``preset``, in the file's order; each has a name or says why it is missing."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    text = resources.files(__package__).joinpath(PRESETS[preset]).read_text(encoding="utf-8")
    rows = tomllib.loads(text).get("backbone", [])
    entries = []
    for i, row in enumerate(rows):
        try:
            entry = ZooEntry(**row)
        except TypeError as exc:
            raise PresetError(f"{PRESETS[preset]}: backbone {i}: {exc}") from None
        if entry.family not in FAMILIES or bool(entry.name) == bool(entry.missing):
            raise PresetError(f"{PRESETS[preset]}: backbone {i} ({entry.bob or entry.name}) needs a family among "
                              f"{', '.join(FAMILIES)} and either a name or why it is missing")
        entries.append(entry)
    return entries


def preset_names(preset: str = "bob") -> list[str]:
    """The backbone names of ``preset`` that a hub has (random-init baselines included), in order."""
    return [e.name for e in load_preset(preset) if e.name]


def expand(names: list[str]) -> list[str]:
    """``names`` with each ``@PRESET`` replaced by that preset's backbone names (duplicates dropped)."""
    out: list[str] = []
    for n in names:
        out += preset_names(n[1:]) if n.startswith("@") else [n]
    return list(dict.fromkeys(out))


def _hub_repo(name: str) -> str | None:
    """The Hugging Face hub repo a backbone's default weights come from, if known."""
    from backbench.extract.backbones.registry import BackboneSpec

    spec = BackboneSpec.parse(name)
    if spec.source in ("hf", "diffusers"):
        return spec.id.split(",")[0]
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.id)
        return getattr(cfg, "hf_hub_id", None) or f"timm/{spec.id}"
    if spec.source == "open_clip":
        import open_clip

        arch, _, tag = spec.id.partition("/")
        return (open_clip.get_pretrained_cfg(arch, tag).get("hf_hub") or "").rstrip("/") or None
    return None


def is_local(name: str, cached: set[str]) -> tuple[bool, str]:
    """(whether ``name``'s weights need no download, how): random init, or its repo in ``cached``."""
    from backbench.extract.backbones.registry import RANDOM, BackboneSpec

    if BackboneSpec.parse(name).weights == RANDOM:
        return True, "random init: no weights"
    try:
        repo = _hub_repo(name)
    except Exception as exc:  # its library is not installed: it cannot be local either
        return False, f"cannot tell ({type(exc).__name__}); install its library"
    if repo and repo in cached:
        return True, f"Hugging Face hub cache ({repo})"
    return False, f"download from the hub ({repo})" if repo else "download"


def preset_rows(preset: str = "bob") -> list[dict[str, Any]]:
    """One dict per entry for ``backbench models --preset``: name (or None), BoB config, family,
    architecture, pretraining, whether its weights are local, and the note or why it is missing."""
    cached = hub_cached()
    rows = []
    for e in load_preset(preset):
        local, how = is_local(e.name, cached) if e.name else (False, "")
        rows.append({"name": e.name, "bob": e.bob or None, "family": e.family, "arch": e.arch,
                     "pretraining": e.pretraining, "on_machine": local, "weights": how or None,
                     "missing": e.missing or None, "note": e.note or None})
    return rows
