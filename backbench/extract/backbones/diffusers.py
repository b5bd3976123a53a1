"""The ``diffusers:`` source: the Stable Diffusion backbone, run the way Battle of the Backbones runs it.

``diffusers:REPO`` (a hub repo, needs the network once), ``diffusers:DIR`` (a pipeline folder in
diffusers' ``save_pretrained`` layout: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``)
or either with ``@random`` (the three models built from their configs, seeded). The feature of
an image (BoB's ``models/stable_diff.py``): the VAE encoder's latent mean times the VAE's scaling
factor (0.18215 in SD 1.x); the UNet's down blocks and middle block only, at timestep 0,
cross-attending to the text encoder's last hidden state for the prompt "image classification";
a GroupNorm over the middle block's output, then the mean over positions (1,280 values in SD).

Timestep, prompt and pooled blocks are options written into the name, after commas, so that
another choice is another name and so another cache group: ``diffusers:REPO,t=100,prompt=,pool=down3+mid``
(``prompt=`` is the empty prompt; a prompt is URL-encoded, ``+`` for a space). Options keep the
order t, prompt, pool and leave defaults out, so one set of features has one name; the group's
provenance records all three (``backbone_info.diffusion``).

Only safetensors weights load (``use_safetensors=True``; a folder whose weights are pickles only
is refused), and no code from a repo runs: the classes are fixed here, and a ``model_index.json``
that names another library's class is refused. diffusers and transformers are imported when a
``diffusers:`` name is loaded.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote_plus, unquote_plus

from backbench.errors import BackboneNotFound, WeightsError, require
from backbench.extract.backbones.hub import cached_repos, hub_or_offline, loading
from backbench.extract.backbones.registry import RANDOM, Backbone, BackboneSpec, register_source
from backbench.extract.backbones.weights import seeded
from backbench.extract.preprocess import Preprocess

DEFAULT_TIMESTEP = 0                      # BoB: ``timesteps = torch.zeros(...)``: the clean latent
DEFAULT_PROMPT = "image classification"   # BoB's fixed prompt
DEFAULT_POOL = ("mid",)                   # BoB: GroupNorm + spatial mean of the middle block's output
OPTIONS = ("t", "prompt", "pool")         # their order in a name
# BoB feeds 256 px images (timm's eval transform: resize to 292, centre-crop 256, bilinear); the
# VAE was trained on pixels in [-1, 1]: mean 0.5, std 0.5 of [0, 1] pixels
PREPROCESS = Preprocess((3, 256, 256), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.875)
COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_POOL_PART = re.compile(r"^(mid|down\d+)$")


@dataclass(frozen=True)
class DiffusionOptions:
    """What the UNet sees and what is pooled: the noise ``timestep`` (no noise is added: the clean
    latent at that timestep's embedding, as BoB), the ``prompt`` cross-attended to, and the blocks
    ``pool`` (``downN``: the N-th down block's output, ``mid``: the middle block's), each
    GroupNorm-ed and averaged over positions, concatenated in UNet order."""

    timestep: int = DEFAULT_TIMESTEP
    prompt: str = DEFAULT_PROMPT
    pool: tuple[str, ...] = DEFAULT_POOL

    def suffix(self) -> str:
        """The options as written in a name: ``,t=..,prompt=..,pool=..``, defaults left out."""
        out = ""
        if self.timestep != DEFAULT_TIMESTEP:
            out += f",t={self.timestep}"
        if self.prompt != DEFAULT_PROMPT:
            out += f",prompt={quote_plus(self.prompt, safe='')}"
        if self.pool != DEFAULT_POOL:
            out += f",pool={'+'.join(self.pool)}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"timestep": self.timestep, "prompt": self.prompt, "pool": list(self.pool)}


def _option(name: str, key: str, value: str) -> Any:
    if key == "t":
        if not value.isdigit():
            raise BackboneNotFound(f"backbone {name!r}: t={value} is not a timestep (a whole number, 0-999 in SD)")
        return int(value)
    if key == "prompt":
        prompt = unquote_plus(value)
        if quote_plus(prompt, safe="") != value:
            raise BackboneNotFound(f"backbone {name!r}: write the prompt URL-encoded as "
                                   f"prompt={quote_plus(prompt, safe='')} (+ for a space)")
        return prompt
    parts = tuple(value.split("+"))
    if not value or not all(_POOL_PART.match(p) for p in parts) or len(set(parts)) != len(parts):
        raise BackboneNotFound(f"backbone {name!r}: pool={value} is not blocks joined by +, each down0, down1, "
                               f"... or mid (e.g. pool=down3+mid)")
    order = sorted(parts, key=lambda p: (p == "mid", int(p[4:]) if p != "mid" else 0))
    if list(parts) != order:
        raise BackboneNotFound(f"backbone {name!r}: name the blocks in UNet order: pool={'+'.join(order)}")
    return parts


def parse_id(ident: str) -> tuple[str, DiffusionOptions]:
    """``REPO|DIR[,t=T][,prompt=P][,pool=B+B]`` -> (the repo or folder, the options).

    A name must be canonical (options in the order t, prompt, pool, none at its default), so
    that the same features always have the same name, and so the same cache group."""
    if Path(ident).expanduser().is_dir():
        return ident, DiffusionOptions()
    base, *pairs = ident.split(",")
    values: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in OPTIONS:
            raise BackboneNotFound(f"backbone diffusers:{ident}: {pair!r} is no option; options are t=TIMESTEP, "
                                   f"prompt=TEXT and pool=BLOCKS, e.g. diffusers:{base},t=100,prompt=,pool=down3+mid")
        if key in values:
            raise BackboneNotFound(f"backbone diffusers:{ident}: option {key} is given twice")
        values[key] = _option(f"diffusers:{ident}", key, value)
    opts = DiffusionOptions(values.get("t", DEFAULT_TIMESTEP), values.get("prompt", DEFAULT_PROMPT),
                            values.get("pool", DEFAULT_POOL))
    if base + opts.suffix() != ident:
        raise BackboneNotFound(f"write this backbone as diffusers:{base + opts.suffix()} (options in the order "
                               f"t, prompt, pool, defaults left out), so one set of features has one name")
    return base, opts


def _valid(ident: str) -> bool:
    base, _ = parse_id(ident)
    path = Path(base).expanduser()
    if path.is_file():
        raise WeightsError(f"diffusers:{base} is a single file; backbench loads a pipeline folder (diffusers' "
                           f"save_pretrained layout with unet/, vae/, text_encoder/, tokenizer/) or a hub repo")
    if base.startswith(("/", ".", "~")) or "\\" in base:
        return path.is_dir()
    return path.is_dir() or bool(_HUB_ID.match(base))


def _cached() -> list[str]:
    """Hub repos in the local Hugging Face cache that hold a diffusers UNet config."""
    return sorted(r.repo_id for r in cached_repos() if r.repo_type == "model"
                  and any(f.file_name == "config.json" and f.file_path.parent.name == "unet"
                          for rev in r.revisions for f in rev.files))


# ---------------------------------------------------------------------------------------- loading
@contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' progress bars, info logging and the deprecation
    warnings they give each other while loading (all restored after)."""
    libs = [require("diffusers.utils.logging", extra="sd"), require("transformers.utils.logging", extra="sd")]
    saved = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, bars, level in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def _pipeline_json(repo: str, local: bool, file: str) -> dict[str, Any]:
    """A JSON file of the pipeline (``model_index.json``, the scheduler's config); {} when there
    is none or it cannot be had."""
    try:
        if local:
            path = Path(repo) / file
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo, file))
        return json.loads(path.read_text()) if path.is_file() else {}
    except Exception:
        return {}


def _check_index(name: str, index: dict[str, Any], where: str) -> None:
    """Refuse a pipeline whose components are not Stable Diffusion 1.x/2.x's library classes:
    another library's class is code from the repo, which backbench never runs."""
    for part, classes in COMPONENTS.items():
        entry = index.get(part)
        if not isinstance(entry, list) or len(entry) != 2:
            continue
        lib, cls = entry
        if lib not in ("diffusers", "transformers"):
            raise WeightsError(f"{name} needs custom code ({part} is {lib}.{cls} in {where}); backbench never "
                               f"runs code from a model repo")
        if cls not in classes:
            raise BackboneNotFound(f"{name}: {part} is {cls} in {where}, not Stable Diffusion 1.x/2.x's "
                                   f"{' or '.join(classes)}")


def _refuse_pickles(name: str, folder: Path) -> None:
    """A component folder with pickled weights and no safetensors file is refused in one line."""
    if not (folder / "unet").is_dir():
        raise WeightsError(f"{name}: {folder} is no diffusers pipeline folder (no unet/); save one with "
                           f"pipeline.save_pretrained(DIR)")
    for part in ("unet", "vae", "text_encoder"):
        files = sorted(p for p in (folder / part).glob("*") if p.is_file())
        pickles = [p.name for p in files if p.suffix in PICKLES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise WeightsError(f"{name}: {folder / part} holds only pickled weights ({', '.join(pickles)}); "
                               f"backbench never unpickles: save them as safetensors "
                               f"(save_pretrained(DIR, safe_serialization=True))")


def _check_unet(name: str, unet: Any) -> None:
    cfg = unet.config
    extra = [k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim") if cfg.get(k) is not None]
    if extra:
        raise BackboneNotFound(f"{name}: its UNet needs more conditioning than a prompt ({', '.join(extra)}); "
                               f"diffusers: runs Stable Diffusion 1.x/2.x UNets")


def _components(name: str, repo: str, where: str, random: bool, why: str = "") -> tuple[Any, Any, Any, Any, str]:
    """(unet, vae, text encoder, tokenizer, weights note): pretrained, or built from the configs."""
    diffusers = require("diffusers", extra="sd")
    transformers = require("transformers", extra="sd")

    unet_cls, vae_cls = diffusers.UNet2DConditionModel, diffusers.AutoencoderKL
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")
        if random:
            seeded()
            unet = unet_cls.from_config(unet_cls.load_config(repo, subfolder="unet"))
            vae = vae_cls.from_config(vae_cls.load_config(repo, subfolder="vae"))
            text = transformers.CLIPTextModel(
                transformers.CLIPTextConfig.from_pretrained(repo, subfolder="text_encoder"))
            return unet, vae, text, tokenizer, f"random init (torch seed 0) from the configs in {where}"
        unet = unet_cls.from_pretrained(repo, subfolder="unet", use_safetensors=True)
        vae = vae_cls.from_pretrained(repo, subfolder="vae", use_safetensors=True)
        text = transformers.CLIPTextModel.from_pretrained(repo, subfolder="text_encoder", use_safetensors=True)
    except (BackboneNotFound, WeightsError):
        raise
    except Exception as exc:
        raise WeightsError(f"cannot load {name} from {where} ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:200]}{why}); offline? a hub repo needs the network "
                           f"once; or give diffusers:/path/to/a/pipeline/dir (safetensors weights)") from exc
    return unet, vae, text, tokenizer, f"pretrained weights from {where} via diffusers (safetensors)"


def prompt_embedding(tokenizer: Any, text_encoder: Any, prompt: str) -> Any:
    """The text encoder's last hidden state for ``prompt``, padded to the tokenizer's length
    (77 for CLIP), as the Stable Diffusion pipelines and BoB compute it: shape (1, tokens, width)."""
    import torch

    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        return text_encoder(ids).last_hidden_state.detach().clone()


# ---------------------------------------------------------------------------------------- backbone
@dataclass
class DiffusionBackbone(Backbone):
    """A :class:`Backbone` whose provenance also records the diffusion options."""

    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "diffusion": self.options}


def _forward(model: Any, x: Any) -> tuple[Any, Any]:
    return model(x), None


@register_source(
    "diffusers", list_ids=_cached, validate=_valid,
    on_machine=lambda: [(f"diffusers:{repo}", "Hugging Face hub cache") for repo in _cached()],
    catalog_note="Hugging Face hub cache",
    about="diffusers: runs the Stable Diffusion backbone as BoB does: a hub repo (diffusers:CompVis/"
          "stable-diffusion-v1-4, needs the network once) or a pipeline folder, with @random; options "
          "after commas: ,t=TIMESTEP ,prompt=TEXT ,pool=BLOCKS (see docs/names.md).",
)
def load_diffusers(spec: BackboneSpec) -> Backbone:
    """``diffusers:REPO|DIR[,options]`` with its safetensors weights, or ``@random``."""
    from backbench.extract.backbones.sd_tower import GROUPNORM_EPS, DiffusionTower

    base, opts = parse_id(spec.id)
    name = f"diffusers:{base}"
    if spec.weights not in (None, RANDOM):
        raise WeightsError(f"diffusers backbones take their weights from the pipeline (diffusers:REPO or "
                           f"diffusers:DIR) or @random; got @{spec.weights}")
    local = Path(base).expanduser().is_dir()
    repo = str(Path(base).expanduser()) if local else base
    where = f"directory {repo}" if local else f"hub repo {repo}"
    random = spec.weights == RANDOM
    if local and not random:
        _refuse_pickles(name, Path(repo))
    with _quiet(), loading(), (nullcontext("") if local else hub_or_offline()) as why:
        _check_index(name, _pipeline_json(repo, local, "model_index.json"), where)
        steps = _pipeline_json(repo, local, "scheduler/scheduler_config.json").get("num_train_timesteps")
        if isinstance(steps, int) and opts.timestep >= steps:
            raise BackboneNotFound(f"{spec}: t={opts.timestep}, but the pipeline's scheduler has timesteps "
                                   f"0..{steps - 1}")
        unet, vae, text, tokenizer, note = _components(name, repo, where, random, why)
    _check_unet(name, unet)
    blocks = len(unet.down_blocks)
    if any(p != "mid" and int(p[4:]) >= blocks for p in opts.pool):
        raise BackboneNotFound(f"{spec}: pool={'+'.join(opts.pool)}, but the UNet has down0..down{blocks - 1} and mid")
    context = prompt_embedding(tokenizer, text.eval(), opts.prompt)
    tower = DiffusionTower(vae, unet, context, opts.timestep, opts.pool)
    options = {**opts.to_dict(), "group_norm_groups": tower.groups, "group_norm_eps": GROUPNORM_EPS,
               "latent_scaling": tower.scaling}
    note += f"; timestep {opts.timestep}, prompt {opts.prompt!r}, pooled {'+'.join(opts.pool)}"
    return DiffusionBackbone(spec, tower, PREPROCESS, _forward, False, note, feature_dim=tower.feature_dim,
                             options=options)
