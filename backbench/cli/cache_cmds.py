"""Commands that build and inspect the cache: models, extract, ls, info, export, import, merge."""

from __future__ import annotations

import time
import warnings
from typing import List, Optional, Tuple

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from backbench.cli import CacheOpt, JsonOpt, app, clean, emit_json, err, out, say_error, table
from backbench.errors import BackbenchError, OptionError, DamagedWarning


@app.command()
def models(
    pattern: Optional[str] = typer.Argument(None, help="Substring or glob to filter names, e.g. 'vit_*'."),
    source: Optional[str] = typer.Option(None, "--source",
                                         help="Only this source: timm, open_clip, torchvision, hf (or a plugin's)."),
    limit: int = typer.Option(200, "--limit", help="At most this many names."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A named list instead: bob (the Battle of the "
                                                               "Backbones zoo by hub names, and what no hub has)."),
    json_: bool = JsonOpt,
) -> None:
    """List backbones that can be named; ✓ marks weights already on this machine.

    Example:  backbench models --source timm 'efficientnet_lite*'
              backbench models --source torchvision resnet
              backbench models --preset bob
    """
    if preset is not None:
        return _preset(preset, json_)
    from backbench.extract.backbones import SOURCES, ensure_sources
    from backbench.extract.catalog import catalog, on_machine

    ensure_sources()
    if source is not None and source not in SOURCES:
        raise OptionError(f"unknown source {source!r}; sources: {', '.join(sorted(SOURCES))}")
    rows = catalog(source, pattern, limit) if (pattern or source) else on_machine()
    if json_:
        return emit_json(rows)
    table(rows, ["name", "on_machine", "weights"], title="backbones")
    if source is not None and SOURCES[source].about:
        out.print(SOURCES[source].about)
    if not (pattern or source):
        out.print("Also any timm, torchvision or open_clip architecture with @random (random init) or @PATH (local\n"
                  "weights), e.g. timm:resnet18@random, torchvision:resnet50@IMAGENET1K_V2, open_clip:ViT-B-32@random;\n"
                  "any transformers vision model as hf:OWNER/NAME or hf:/path/to/dir.\n"
                  "Browse: backbench models --source timm vit; backbench models --source torchvision resnet")


def _preset(preset: str, json_: bool) -> None:
    """``models --preset NAME``: each entry, whether its weights are local, and why a missing one is."""
    from backbench.extract.backbones.zoo import preset_rows

    rows = preset_rows(preset)
    if json_:
        return emit_json(rows)
    shown = [{**r, "name": r["name"] or "(no hub)", "bob": r["bob"] or "-",
              "weights": r["weights"] if r["name"] else "missing: " + r["missing"]} for r in rows]
    table(shown, ["name", "bob", "family", "on_machine", "weights"], title=f"preset {preset}")
    have = sum(1 for r in rows if r["name"])
    out.print(f"{have} of {len(rows)} entries have a hub name; a battle config takes them all as preset = "
              f"\"{preset}\" or backbones = [\"@{preset}\"]. Sources and notes: docs/names.md#the-bob-zoo")


def _parse_shard(shard: str) -> tuple[int, int]:
    """``"0/4"`` -> ``(0, 4)``; anything but I/N with 0 <= I < N is a usage error (a real check,
    not an ``assert``, which ``python -O`` strips)."""
    bad = OptionError(f"--shard {shard!r} must be I/N with 0 <= I < N, e.g. 0/4")
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise bad from None
    if not 0 <= i < n:
        raise bad
    return i, n


class _LazyBar:
    """A rich progress bar with images/s that appears once extraction starts.

    Its clock starts when extraction reports ``(0, total)``, where the clock of the final
    line's rate starts, and :meth:`finish` ends it on that line's rate, so the two agree.
    """

    def __init__(self, label: str) -> None:
        self.label, self.bar, self.task, self.t0 = clean(label), None, None, 0.0

    def __enter__(self) -> _LazyBar:
        return self

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=err)
            self.bar.start()
            self.task, self.t0 = self.bar.add_task(self.label, total=total, rate="-"), now
        rate = f"{done / (now - self.t0):.1f}" if done and now > self.t0 else "-"
        self.bar.update(self.task, completed=done, total=total, rate=rate)

    def finish(self, images_per_s: float) -> None:
        """End on the rate extraction measured (the one the final line prints)."""
        if self.bar is not None:
            self.bar.update(self.task, rate=f"{images_per_s:.1f}")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def extract(
    backbones: List[str] = typer.Argument(..., help="One or more SOURCE:ID[@WEIGHTS] names."),
    data: str = typer.Option(..., "--data", help="imagefolder:PATH, csv:PATH, cifar10-mini, digits, textures, shapes, "
                                                 "torchvision:NAME:ROOT, hf-dataset:NAME[:CONFIG][?image=COL&label=COL], "
                                                 "wds:PATTERN; with masks or boxes: segfolder:IMAGES:MASKS, voc:ROOT, "
                                                 "ade20k:ROOT, coco:IMAGES:ANNOTATIONS.json."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name in the cache, e.g. cifar10 "
                                          "(default for a built-in --data such as digits: its name)."),
    split: str = typer.Option(..., "--split", help="Split name in the cache, e.g. train."),
    cache: Optional[str] = CacheOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: 256 on CUDA, 64 on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 features."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (default: cores)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N samples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a group made differently."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1, help="Rows per Zarr chunk."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: extract only the chunks of shard I."),
    on_error: str = typer.Option("fail", "--on-error", help="fail or skip an unreadable image."),
    processes: int = typer.Option(1, "--processes", min=1, help="Launch N local shard processes (--shard i/N)."),
    decode: str = typer.Option("auto", "--decode",
                               help="workers (PIL), device (JPEGs on the GPU with nvJPEG), mixed (the workers "
                                    "decode what they can in time, the GPU the rest) or auto (mixed on CUDA)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the forward pass (pays off on long runs)."),
    features: Optional[List[str]] = typer.Option(None, "--features",
                                                 help="Feature kinds: pooled (default) cls mean-patch cls+mean-patch map."),
    layers: Optional[List[int]] = typer.Option(None, "--layers",
                                               help="Also from these blocks, counted from the end: -1 -4."),
    views: str = typer.Option("center", "--views", help="center, flip or center+flip (averaged)."),
    map_grid: Optional[Tuple[int, int]] = typer.Option(None, "--map-grid", min=1, metavar="H W",
                                                      help="Average-pool feature maps down to H x W."),
    labels: Optional[List[str]] = typer.Option(None, "--labels",
                                               help="Multi-label csv: the 0/1 label columns (or '*': all but path)."),
    download: bool = typer.Option(False, "--download", help="Let a torchvision: dataset download missing files into ROOT."),
    json_: bool = JsonOpt,
) -> None:
    """Extract frozen-backbone features into the cache; reruns resume and skip finished work.

    Example:  backbench extract timm:tf_efficientnet_lite0@local timm:resnet18@random --data digits --split train
    """
    from backbench.extract.backbones import resolve
    from backbench.extract.datasets import open_source

    if dtype not in ("float16", "float32"):
        raise OptionError(f"--dtype {dtype!r}: use float16 or float32")
    if on_error not in ("fail", "skip"):
        raise OptionError(f"--on-error {on_error!r}: use fail or skip")
    shard_at, dataset = _parse_shard(shard), dataset or _builtin_name(data)
    for name in backbones:  # fail fast on typos before any model loads
        resolve(name)
    if processes > 1:
        if download:  # fetch once here, not in N shard processes racing to write the same files
            open_source(data, split, download=True)
        return _launch_shards(processes)
    # the cache goes by path: extract() opens (creates) it once the backbone has loaded
    source = open_source(data, split, download=download, labels=labels)
    options = dict(cache=cache, dataset=dataset, split=split, batch_size=batch_size, device=device, dtype=dtype,
                   workers=workers, limit=limit, overwrite=overwrite, chunk_rows=chunk_rows, shard=shard_at,
                   on_error=on_error, decode=decode, compile=compile_, features=features, layers=layers, views=views,
                   map_grid=map_grid)
    results = [_extract_one(name, source, options, quiet=json_) for name in backbones]
    if json_:
        emit_json(results)


def _builtin_name(data: str) -> str:
    """The dataset name a built-in --data gives itself (digits, textures); others need --dataset."""
    from backbench.extract.datasets import SOURCES

    builtin = [k for k, kind in SOURCES.items() if kind.example is None]  # sets that take no path
    if data not in builtin:
        raise OptionError(f"missing option --dataset: name the dataset in the cache (e.g. --dataset pets); "
                          f"only a built-in --data ({', '.join(builtin)}) names itself")
    return data


def _extract_one(name: str, source, options: dict, quiet: bool) -> dict:
    """One backbone's extraction under a progress bar; says what it did unless ``quiet`` (--json)."""
    from backbench.extract.run import extract as run

    dataset, split = options["dataset"], options["split"]
    with _LazyBar(f"{name} {dataset}/{split}") as bar:
        res = run(name, source, progress=bar, **options,
                  on_wait=lambda: err.print(f"{name} {dataset}/{split}: another process is extracting this "
                                            f"group; waiting for it, then doing what is left"),
                  on_plan=lambda line: (err if quiet else out).print(f"{name} {dataset}/{split}: {line}"))
        bar.finish(res.images_per_s)
    if not quiet:
        _say_extracted(res)
    return res.to_dict()


def _launch_shards(n: int) -> None:
    """Run this same command as N processes, one per shard; each writes whole chunks only."""
    import os
    import subprocess
    import sys

    args = sys.argv[1:] if sys.argv[1:2] == ["extract"] else None
    if args is None:
        raise BackbenchError("--processes works from the command line; in Python call extract(..., shard=(i, n))")
    base, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--processes", "--shard"):
            skip = True
            continue
        if not a.startswith(("--processes=", "--shard=")):
            base.append(a)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    procs = [subprocess.Popen([sys.executable, "-m", "backbench", *base, "--shard", f"{i}/{n}"], env=env)
             for i in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise BackbenchError(f"shard process(es) {[i for i, c in enumerate(codes) if c]} failed; rerun to finish")
    out.print(f"{n} shard processes finished")


def _say_extracted(res) -> None:
    if res.status == "up-to-date":
        out.print(f"{res.backbone} {res.dataset}/{res.split}: already complete ({res.n} rows), nothing to do")
    else:
        on_device = res.decoded_on_device
        out.print(f"{res.backbone} {res.dataset}/{res.split}: {res.status} {res.rows_written} rows "
                  f"in {res.seconds:.1f}s ({res.images_per_s:.1f} img/s)"
                  + (f", {on_device / max(res.rows_written, 1):.0%} decoded on the device"
                     if on_device is not None else "")
                  + (f", {res.waited_s / res.seconds:.0%} of the time waiting for images"
                     if res.seconds and res.waited_s > 0.1 * res.seconds else "")
                  + (f", skipped {len(res.skipped)}" if res.skipped else ""))


@app.command("ls")
def ls_(cache: Optional[str] = CacheOpt, json_: bool = JsonOpt) -> None:
    """List the cache's groups: backbone × dataset × split × N × D × complete.

    Example:  backbench ls --cache features.zarr
    """
    from backbench.store import Cache

    from backbench.errors import DamagedGroup

    store = Cache(cache, mode="r")
    rows, broken = [], [message for _, message in store.damaged()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedWarning)  # listed below, from store.damaged()
        for g in store.groups():
            try:
                rows.append(g.summary())
            except DamagedGroup as exc:  # no numbers from a group whose attributes disagree with its arrays
                broken.append(str(exc))
    if json_:
        emit_json({"groups": rows, "damaged": broken} if broken else rows)
    elif not rows and not broken:
        out.print(f"{store.path}: empty; fill it with `backbench extract`")
    elif rows:
        for r in rows:
            r["N"], r["D"] = r["n"], r["dim"]
            r["rows"] = r["rows_done"]
        table(rows, ["backbone", "dataset", "split", "features", "N", "D", "dtype", "rows", "logits", "complete"],
              title=str(store.path))
    for message in broken:
        say_error(message)
    if broken:
        raise typer.Exit(1)


@app.command()
def info(
    backbone: str = typer.Argument(..., help="Backbone name as extracted."),
    dataset: str = typer.Argument(...),
    split: str = typer.Argument(...),
    features: str = typer.Option("pooled", "--features", help="Feature kind: cls, layer-4:cls, cls@flip, ..."),
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """Show one group's provenance: weights hash, preprocessing, dataset fingerprint, versions.

    Example:  backbench info timm:resnet18@random digits train [--features cls]
    """
    from backbench.kinds import parse_kind
    from backbench.store import Cache

    parse_kind(features)
    group = Cache(cache, mode="r").group(backbone, dataset, split, features)
    attrs = {**group.attrs, **group.summary()}
    if json_:
        return emit_json(attrs)
    rows = [{"key": k, "value": _whole(v)} for k, v in attrs.items() if k != "skipped"]
    if out.is_terminal:
        table(rows, ["key", "value"], title=group.path)
    else:  # pipes and logs: one `key: value` line each, every value whole
        out.print(group.path, soft_wrap=True)
        for r in rows:
            out.print(f"{r['key']}: {r['value']}", soft_wrap=True)
    for s in attrs.get("skipped", []):
        out.print(f"skipped {s['id']}: {s['error']}", soft_wrap=True)


def _whole(value: object) -> object:
    """An attribute as text, all of it (floats unrounded, records and lists as compact JSON)."""
    import json

    if isinstance(value, bool):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    return str(value)
