"""Commands that check and move caches: export, verify, pack, unpack, merge, import."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from backbench.cli import CacheOpt, JsonOpt, app, emit_json, out, table
from backbench.errors import BackbenchError


@app.command()
def export(
    to: Path = typer.Option(..., "--to", help="Target HDF5 file, e.g. features.h5."),
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """Copy the cache into one HDF5 file (h5py): same arrays, attributes as JSON.

    Example:  backbench export --to features.h5
    """
    from backbench.store import Cache
    from backbench.store.export import export_h5

    written = export_h5(Cache(cache, mode="r"), to)
    if json_:
        return emit_json({"file": str(to), "groups": written})
    out.print(f"wrote {len(written)} group(s) to {to}")


@app.command()
def verify(cache: Optional[str] = CacheOpt, json_: bool = JsonOpt) -> None:
    """Recompute every chunk's checksum and report chunks that changed on disk (exit 1 if any).

    Example:  backbench verify --cache features.zarr
    """
    from backbench.store import Cache
    from backbench.store.verify import incomplete, verify as run

    store = Cache(cache, mode="r")
    problems, checked = run(store)
    unfinished = incomplete(store)
    if json_:
        emit_json({"chunks_checked": checked, "problems": problems, "incomplete": unfinished})
    elif problems:
        table(problems, ["group", "chunk", "rows", "status", "detail"],
              title=f"{len(problems)} problem(s); {checked} chunk(s) checked")
    else:
        out.print(f"{checked} chunk(s) verified: all checksums match")
    for g in unfinished if not json_ else []:
        out.print(f"incomplete: {g['group']} has {g['rows_done']} of {g['n']} rows (reads refuse it); "
                  f"finish it with `backbench extract`")
    if problems:
        raise typer.Exit(1)


@app.command()
def pack(
    groups: Optional[List[str]] = typer.Argument(None, help="Group paths from `backbench ls --json` (default: all)."),
    to: Path = typer.Option(..., "--to", help="Target zip file."),
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """Pack groups (with their provenance and results records) into one zip to share.

    Example:  backbench pack 'timm~resnet18@random/pets/train' --to pets.zip
    """
    from backbench.store import Cache
    from backbench.store.share import pack as run

    manifest = run(Cache(cache, mode="r"), list(groups or []), to)
    if json_:
        return emit_json({"file": str(to), **manifest})
    out.print(f"packed {len(manifest['groups'])} group(s) and {manifest['records']} record(s) into {to}"
              + (f", with the {len(manifest['text'])} text embedding group(s) they read" if manifest["text"] else ""))


@app.command()
def unpack(
    archive: Path = typer.Argument(..., help="A zip made by `backbench pack`."),
    into: Optional[str] = typer.Option(None, "--into", envvar="BACKBENCH_CACHE", help="Cache to unpack into."),
    max_size: Optional[str] = typer.Option(None, "--max-size",
                                           help="Refuse packs that unpack to more (20GB, 500MB). "
                                                "Default: 10x the pack's size."),
    json_: bool = JsonOpt,
) -> None:
    """Unpack a pack into a cache: unsafe members refused, every chunk verified, conflicts refused.

    Nothing enters the cache unless the whole pack checks out.

    Example:  backbench unpack pets.zip --into features.zarr
    """
    from backbench.probe.stream import parse_size
    from backbench.store.share import unpack as run

    try:
        limit = parse_size(max_size)
    except BackbenchError:
        raise BackbenchError(f"--max-size {max_size!r}: give a size such as 20GB or 500MB") from None
    result = run(archive, into, max_size=limit)
    if json_:
        return emit_json(result)
    out.print(f"unpacked {len(result['groups'])} group(s), {result['records']} record(s)"
              + (f", {len(result['text'])} text embedding group(s)" if result["text"] else "") + "; "
              f"{result['chunks_verified']} chunk(s) verified")


@app.command()
def merge(
    caches: List[str] = typer.Argument(..., help="Caches to combine (read only)."),
    into: str = typer.Option(..., "--into", help="Target cache, created if absent (not one of the inputs)."),
    json_: bool = JsonOpt,
) -> None:
    """Merge caches into one: every group and results record; chunks verified, conflicts refused.

    Example:  backbench merge a.zarr b.zarr --into all.zarr
    """
    from backbench.store.merge import merge_caches

    result = merge_caches(list(caches), into)
    if json_:
        return emit_json(result)
    incomplete = result["incomplete"]
    out.print(f"merged {len(caches)} cache(s) into {into}: {len(result['groups_copied'])} group(s) copied "
              f"({result['chunks_copied']} chunk(s) verified), {len(result['groups_present'])} already present, "
              f"{result['records_copied']} record(s) copied"
              + (f", {len(result['texts_copied'])} text embedding group(s) copied" if result["texts_copied"] else "")
              + (f"; {len(incomplete)} incomplete (finish with `backbench extract`)" if incomplete else ""))


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="HDF5 file from `backbench export`, or features from another tool."),
    cache: Optional[str] = CacheOpt,
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b",
                                           help="Backbone name for other tools' files (exports: pick groups)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name in the cache, e.g. pets."),
    split: Optional[str] = typer.Option(None, "--split", help="Split name in the cache, e.g. train."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16 (default) or float32, for other tools' files."),
    json_: bool = JsonOpt,
) -> None:
    """Import an HDF5 file: a `backbench export`, or features + labels from another tool (thingsvision).

    Example:  backbench import clip_train.h5 --backbone thingsvision:clip --dataset pets --split train
    """
    from backbench.store import Cache
    from backbench.store.export import import_report

    result = import_report(file, Cache(cache), backbone=backbone, dataset=dataset, split=split, dtype=dtype)
    if json_:
        return emit_json(result)
    present, incomplete = result["already_present"], result["incomplete"]
    if not result["groups"]:
        out.print(f"{file}: {len(present)} group(s) already present in {result['cache']}, nothing to do")
        return
    out.print(f"imported {len(result['groups'])} group(s) from {file} into {result['cache']} "
              f"({result['chunks_copied']} chunk(s))"
              + (f", {len(present)} already present" if present else "")
              + (f"; {len(incomplete)} incomplete as exported" if incomplete else ""))
