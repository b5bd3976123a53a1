"""The ``hf:`` source: any transformers vision model, a hub id or a ``save_pretrained`` directory.

Code shipped in a model repo never runs (``trust_remote_code=False`` everywhere, and a repo
that needs its own code is refused in one line). transformers is imported when an ``hf:``
name is loaded; listing reads only the local Hugging Face cache.
"""

from __future__ import annotations

import inspect
import json
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from backbench.errors import BackboneNotFound, WeightsError, require
from backbench.extract.backbones.hub import cached_repos, hub_or_offline, loading
from backbench.extract.backbones.registry import LOCAL, Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import IMAGENET_MEAN, IMAGENET_STD, crop_pct
from backbench.extract.backbones.weights import apply_state_dict, read_state_dict, seeded
from backbench.extract.preprocess import Preprocess

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _cached() -> list[str]:
    """Hub repos in the local Hugging Face cache that hold a transformers ``config.json``
    (``timm/`` repos are listed as ``timm:`` names instead)."""
    return sorted(
        r.repo_id for r in cached_repos()
        if r.repo_type == "model" and not r.repo_id.startswith("timm/")
        and any(f.file_name == "config.json" for rev in r.revisions for f in rev.files)
    )


def _is_dir(ident: str) -> bool:
    return Path(ident).expanduser().is_dir()


def _valid(ident: str) -> bool:
    if ident.startswith(("/", ".", "~")) or "\\" in ident:
        return _is_dir(ident)
    return _is_dir(ident) or bool(_HUB_ID.match(ident))


def _forward(model: Any, x: Any) -> tuple[Any, Any]:
    return model(x), None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    h, w = _get(value, "height"), _get(value, "width")
    if h and w:
        return int(h), int(w)
    s = _get(value, "shortest_edge")
    return (int(s), int(s)) if s else None


def _interpolation(resample: Any) -> str:
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    return _PIL_RESAMPLE.get(int(value), "bicubic") if value is not None else "bicubic"


def _config_size(config: Any) -> tuple[int, int]:
    size = _get(config, "image_size") or _get(_get(config, "vision_config"), "image_size") or 224
    return _size(size) or (224, 224)


def preprocess_of(processor: Any, config: Any) -> tuple[Preprocess, str]:
    """The image processor's resize/crop/normalization as a :class:`Preprocess`; without a
    processor, ImageNet defaults at the config's ``image_size``. Returns it and a note."""
    if processor is None:
        h, w = _config_size(config)
        return Preprocess((3, h, w), IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875), \
            "no image processor saved: ImageNet preprocessing at the config's image_size"
    size = _get(processor, "size")
    crop = _size(_get(processor, "crop_size")) if _get(processor, "do_center_crop") else None
    shortest = _get(size, "shortest_edge")
    resize = _size(size)
    if crop is not None:
        input_hw = crop
        pct = crop_pct(min(crop), min(resize)) if resize else 1.0
    elif resize is not None:
        input_hw = resize
        given = _get(processor, "crop_pct")  # ConvNeXt: resize to shortest_edge / crop_pct, crop shortest_edge
        pct = float(given) if shortest and given and int(shortest) < 384 else 1.0
    else:
        input_hw, pct = _config_size(config), 1.0
    if _get(processor, "do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(float(v) for v in (_get(processor, "image_mean") or IMAGENET_MEAN))
        std = tuple(float(v) for v in (_get(processor, "image_std") or IMAGENET_STD))
    interp = _interpolation(_get(processor, "resample"))
    return Preprocess((3, *input_hw), mean, std, interp, pct), f"{type(processor).__name__}"


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and info logging while loading (restored after)."""
    hf_logging = require("transformers.utils.logging", extra="hf")

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _custom_code(repo: str, files: tuple[str, ...]) -> list[str]:
    """What the ``auto_map`` of these config files of the repo names: Python code in the repo."""
    cached_file = require("transformers.utils", extra="hf").cached_file

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


def _refuse_custom_code(spec: BackboneSpec, repo: str, where: str, file: str = "config.json") -> None:
    """Raise the one-line refusal if loading failed because ``file`` asks for the repo's own code."""
    names = _custom_code(repo, (file,))
    if names:
        raise WeightsError(
            f"hf:{spec.id} needs custom code ({', '.join(names)} in {where}); backbench never runs code from "
            f"a model repo: use a model transformers supports itself, or build the module in Python and "
            f"pass it to backbench.extract.backbones.custom_backbone()"
        )


def _refuse_random_tensors(spec: BackboneSpec, base: Any, missing: list[str], where: str) -> None:
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


def _config(spec: BackboneSpec, repo: str, where: str, why: str) -> Any:
    AutoConfig = require("transformers", extra="hf").AutoConfig

    try:
        return AutoConfig.from_pretrained(repo, trust_remote_code=False)
    except Exception as exc:
        _refuse_custom_code(spec, repo, where)
        raise WeightsError(
            f"cannot read a transformers config from {where} ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}{why}); offline? a hub id needs the network once, "
            f"or give hf:/path/to/a/save_pretrained/dir"
        ) from exc


def _base(spec: BackboneSpec, repo: str, where: str, config: Any) -> tuple[Any, list[str], str]:
    """The base model with its pretrained weights (or random init, then ``@PATH`` weights).
    Returns (model, the keys its weights lacked, the weights note)."""
    AutoModel = require("transformers", extra="hf").AutoModel

    try:
        if spec.weights is None:
            base, info = AutoModel.from_pretrained(repo, output_loading_info=True, trust_remote_code=False)
            missing = list(info.get("missing_keys", []))
            commit = getattr(config, "_commit_hash", None)
            note = f"pretrained weights from {where} via transformers"
            note += f" (commit {commit[:12]})" if commit else ""
        else:
            seeded()
            base = AutoModel.from_config(config, trust_remote_code=False)
            missing, note = [], "random init (torch seed 0)"
    except Exception as exc:
        _refuse_custom_code(spec, repo, where)
        raise WeightsError(f"cannot build a transformers model from {where} ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:160]})") from exc
    path = spec.weights_path
    if path is not None:
        pooler_keys = {k for k in base.state_dict() if k.startswith("pooler.")}
        with_pooler, how = apply_state_dict(base, _strip_prefix(read_state_dict(path), base), pooler_keys)
        missing = [] if with_pooler else sorted(pooler_keys)
        note = f"{path}: {how}"
    return base, missing, note


def _processor(spec: BackboneSpec, repo: str, where: str) -> Any:
    """The repo's image processor, or None when it has none (never defaults for custom code)."""
    AutoImageProcessor = require("transformers", extra="hf").AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(repo, trust_remote_code=False)
    except Exception:
        _refuse_custom_code(spec, repo, where, "preprocessor_config.json")
        return None


@register_source(
    "hf", list_ids=_cached, validate=_valid,
    on_machine=lambda: [(f"hf:{repo}", "Hugging Face hub cache") for repo in _cached()],
    catalog_note="Hugging Face hub cache",
    about="hf: takes any transformers vision model: a hub id (hf:facebook/dinov2-small, needs the network once) "
          "or a save_pretrained directory (hf:/path/to/dir), with @random or @PATH. Listing the hub needs the "
          "network, so only repos already in the local Hugging Face cache are shown.",
)
def load_hf(spec: BackboneSpec) -> Backbone:
    """``hf:REPO`` or ``hf:/path/to/dir``, with its weights, ``@random`` or ``@PATH``."""
    from backbench.extract.backbones.towers import HFImageTower

    local = _is_dir(spec.id)
    repo = str(Path(spec.id).expanduser()) if local else spec.id
    where = f"directory {repo}" if local else f"hub repo {repo}"
    if spec.weights == LOCAL:
        raise WeightsError(f"hf: has no @local weights; a hub repo in the local cache loads as hf:{spec.id}, "
                           f"a directory as hf:/path/to/dir")
    with _quiet(), loading(), (nullcontext("") if local else hub_or_offline()) as why:
        config = _config(spec, repo, where, why)
        base, missing, note = _base(spec, repo, where, config)
        _refuse_random_tensors(spec, base, missing, where)
        pool = "pooler"
        if any(k.startswith("pooler.") or ".pooler." in k for k in missing):
            pool = "cls"  # the pooler was not in the weights (e.g. DINO ViTs): never use an untrained layer
            note += "; no pooler weights, features are the CLS token"
        target = base.vision_model if hasattr(base, "get_image_features") and hasattr(base, "vision_model") else base
        if "pixel_values" not in inspect.signature(target.forward).parameters:
            raise BackboneNotFound(f"hf:{spec.id} is a {type(base).__name__}, not a vision model "
                                   f"(its forward takes no pixel_values)")
        processor = _processor(spec, repo, where)
    pre, how = preprocess_of(processor, config)
    if processor is None:
        note += f"; {how}"
    return Backbone(spec, HFImageTower(base, pool), pre, _forward, False, note)


def text_encoder(spec: BackboneSpec, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The text tower of an ``hf:`` model with one (CLIP, SigLIP: ``get_text_features``) and the
    repo's own tokenizer, on ``device``: ``(encode(texts) -> (n, d) tensor, info)``. The model loads as
    :func:`load_hf` loads it, so ``info["image_weights_sha256"]`` is what its image groups record.
    Texts are padded to the tokenizer's maximum length (SigLIP was trained that way; CLIP masks
    the padding)."""
    import torch

    from backbench.errors import NotApplicable
    from backbench.extract.backbones.towers import HFImageTower
    from backbench.extract.backbones.weights import state_dict_sha256

    AutoTokenizer = require("transformers", extra="hf").AutoTokenizer
    local = _is_dir(spec.id)
    repo = str(Path(spec.id).expanduser()) if local else spec.id
    where = f"directory {repo}" if local else f"hub repo {repo}"
    with _quiet(), loading(), (nullcontext("") if local else hub_or_offline()) as why:
        config = _config(spec, repo, where, why)
        base, missing, note = _base(spec, repo, where, config)
        if not (hasattr(base, "get_text_features") and hasattr(base, "vision_model")):
            raise NotApplicable(f"hf:{spec.id} is a {type(base).__name__}: it has no text tower for zero-shot "
                                f"or text retrieval (CLIP and SigLIP models do)")
        _refuse_random_tensors(spec, base, missing, where)
        try:
            tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=False)
        except Exception as exc:
            _refuse_custom_code(spec, repo, where, "tokenizer_config.json")
            raise WeightsError(f"cannot read the tokenizer of {where} ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:160]}{why})") from exc
    text_cfg = _get(config, "text_config")
    length = int(_get(text_cfg, "max_position_embeddings") or 64)
    if 0 < int(getattr(tokenizer, "model_max_length", 0) or 0) < length:
        length = int(tokenizer.model_max_length)

    def encode(texts: list[str]) -> Any:
        tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                           return_tensors="pt")
        names = set(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
        with torch.inference_mode():  # what the tokenizer gives its model: SigLIP's gives no attention mask
            out = base.get_text_features(**{k: v.to(device) for k, v in tokens.items()
                                            if k in names and k != "token_type_ids"})
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output

    info = {"image_weights_sha256": state_dict_sha256(HFImageTower(base, "pooler").state_dict()),
            "weights_sha256": state_dict_sha256(base.state_dict()),
            "tokenizer": f"{type(tokenizer).__name__} of {where}, padded to {length}", "weights_note": note}
    base.eval().requires_grad_(False).to(device)
    return encode, info
