"""Commands on cached features: probe (linear and few-shot) and results."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import typer

from backbench.cli import CacheOpt, JsonOpt, app, emit_json, err, table
from backbench.cli.task_cmds import Common, emit_records, run_request, task_command
from backbench.errors import OptionError

BackboneOpt = typer.Option(..., "--backbone", "-b", help="Backbone name as extracted.")
DatasetOpt = typer.Option(..., "--dataset", "-d", help="Dataset name in the cache.")


def parse_grid(text: Optional[List[str]]) -> Optional[list[float]]:
    """``--C 0.01 0.1 1`` or ``--C 0.01,0.1,1`` or ``--C log:-4:4:13`` (10**linspace)."""
    if not text:
        return None
    items = [p for t in text for p in t.split(",") if p]
    try:
        if len(items) == 1 and items[0].startswith("log:"):
            lo, hi, num = items[0][4:].split(":")
            return (10.0 ** np.linspace(float(lo), float(hi), int(num))).tolist()
        grid = [float(v) for v in items]
    except ValueError:
        raise OptionError(f"--C {' '.join(text)!r}: give numbers (0.1 1 10) or log:LO:HI:NUM") from None
    if any(c <= 0 for c in grid):
        raise OptionError("--C values must be positive")
    return grid


def _metrics_row(record: dict, reused: bool) -> dict:
    m = record["metrics"]
    return {"task": record["task"], "shots": record["params"].get("shots", "all"), "seed": record["seed"],
            "C": record["chosen_C"], "top1": m["top1"], "top5": m.get("top5"), "mean_per_class": m["mean_per_class"],
            "log_loss": m["log_loss"], "ece": m["ece"], "reused": reused}


@app.command()
@task_command
def probe(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    train: str = typer.Option(..., "--train", help="Split to fit on."),
    eval_: str = typer.Option(..., "--eval", help="Split to evaluate on (never used for selection)."),
    val: Optional[str] = typer.Option(None, "--val", help="Split to select C on (default: 10% of train)."),
    C: Optional[List[str]] = typer.Option(None, "--C", help="C grid: 0.01 0.1 1, or log:-4:4:13."),
    shots: Optional[List[int]] = typer.Option(None, "--shots", help="Few-shot: K images per class, e.g. 1 2 4 8 16."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Few-shot draws per K."),
    common: Common = None,
) -> None:
    """Linear probe (L2 logistic regression, C swept) or few-shot probe on cached features.

    Example:  backbench probe -b timm:resnet18@random -d digits --train train --eval test --shots 1 5 10
    """
    from backbench.probe.tasks import summarize_few_shot

    grid = parse_grid(C)  # a typing mistake is told before the cache is opened
    params = {"C": grid, **({"shots": shots, "seeds": seeds} if shots else {})}
    pairs = run_request("fewshot" if shots else "probe", common, backbone, dataset,
                        {"train": train, "eval": eval_, "val": val}, params)
    if emit_records(pairs, common):
        return
    if pairs and pairs[0][0]["task"] == "probe-multilabel":
        return _multilabel_table(*pairs[0], backbone, dataset)
    table([_metrics_row(r, reused) for r, reused in pairs],
          ["task", "shots", "seed", "C", "top1", "top5", "mean_per_class", "log_loss", "ece", "reused"],
          title=f"{backbone} on {dataset}: train {train}, eval {eval_}")
    if shots:
        table(summarize_few_shot([r for r, _ in pairs]), ["shots", "top1_mean", "top1_std", "seeds"],
              title="few-shot top-1, mean ± std over seeds")


def _multilabel_table(r: dict, reused: bool, backbone: str, dataset: str) -> None:
    m = r["metrics"]
    table([{"label": k, "auroc": v, "eval_positives": m["positives_eval"].get(k)} for k, v in m["auroc"].items()],
          ["label", "auroc", "eval_positives"],
          title=f"{backbone} on {dataset} (multi-label, one-vs-rest): mean_auroc {m['mean_auroc']:.4f}, "
                f"mean_ap {m['mean_ap']:.4f}, C {r['chosen_C']:g}" + (" (reused)" if reused else ""))


@app.command()
def results(
    task: Optional[str] = typer.Option(None, "--task", help="Only this task (probe, fewshot, knn, ...)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b"),
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """List the results log's records.

    Example:  backbench results --task probe --json
    """
    from backbench.store.results import ResultsLog
    from backbench.store import Cache

    rows = [r for r in ResultsLog(Cache(cache, mode="r")).records()
            if (task is None or r["task"] == task) and (backbone is None or r["backbone"] == backbone)]
    if json_:
        return emit_json(rows)
    view = [{"task": r["task"], "backbone": r["backbone"], "dataset": r["dataset"],
             "splits": " ".join(f"{k}={v}" for k, v in r["splits"].items() if v),
             "params": _params(r), "seed": r["seed"], "main": _main_metric(r), "wall_s": r["wall_s"],
             "created": r["created"]} for r in rows]
    table(view, ["task", "backbone", "dataset", "splits", "params", "seed", "main", "wall_s", "created"],
          title=f"{len(rows)} record(s)")


def _params(r: dict) -> str:
    """The record's parameters, the C grid in full, and the C the sweep chose."""
    shown = {k: ",".join(f"{c:g}" for c in v) if k == "Cs" and isinstance(v, list) else v
             for k, v in r.get("params", {}).items()}
    if isinstance(r.get("chosen_C"), (int, float)):
        shown["chosen_C"] = f"{r['chosen_C']:g}"
    return " ".join(f"{k}={v}" for k, v in shown.items())


def _main_metric(r: dict) -> str:
    m = r.get("metrics", {})
    for key in ("top1", "mAP", "auroc"):
        if key in m:
            return f"{key}={m[key]:.4f}"
    return ""


@app.command()
@task_command
def knn(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    train: str = typer.Option(..., "--train", help="Split that votes (the index)."),
    eval_: str = typer.Option(..., "--eval", help="Split to classify."),
    k: Optional[List[int]] = typer.Option(None, "-k", help="Neighbour counts, e.g. 10 20 100 200 (one search)."),
    temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(sim / T)."),
    shots: Optional[List[int]] = typer.Option(None, "--shots", help="Few-shot: K train images per class."),
    seeds: int = typer.Option(3, "--seeds", min=1),
    common: Common = None,
) -> None:
    """Weighted kNN classification (DINO's vote, cosine similarity, faiss) on cached features.

    Example:  backbench knn -b timm:resnet18@random -d digits --train train --eval test -k 10 20
    """
    params = {"k": k, "temperature": temperature, **({"shots": shots, "seeds": seeds} if shots else {})}
    pairs = run_request("knn-fewshot" if shots else "knn", common, backbone, dataset,
                        {"train": train, "eval": eval_}, params)
    if emit_records(pairs, common):
        return
    # the ks actually used: a k beyond the gallery is reported as the gallery's size
    ks = sorted({x for r, _ in pairs for x in r.get("ks_used", r["params"]["ks"])})
    rows = [{"shots": r["params"].get("shots", "all"), "seed": r["seed"], "reused": reused,
             **{f"top1@{x}": r["metrics"].get(f"top1@{x}") for x in ks},
             **{f"top5@{x}": r["metrics"].get(f"top5@{x}") for x in ks}} for r, reused in pairs]
    if note := _clip_note([r for r, _ in pairs]):
        err.print(note)
    table(rows, ["shots", "seed", *[f"top1@{x}" for x in ks], *[f"top5@{x}" for x in ks], "reused"],
          title=f"kNN {backbone} on {dataset}: train {train}, eval {eval_}")


def _clip_note(records: list[dict]) -> str:
    """A note naming the ks larger than their gallery, and the k each is reported as."""
    pairs = sorted({(int(k), int(n)) for r in records for k, n in r.get("k_clipped", {}).items()})
    if not pairs:
        return ""
    said = ", ".join(f"k={k} as top1@{n}" for k, n in pairs)
    return f"note: k larger than the gallery (the train rows that vote) uses every gallery row: reported {said}"


@app.command()
@task_command
def retrieve(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    query: str = typer.Option(..., "--query", help="Split of queries."),
    gallery: str = typer.Option(..., "--gallery", help="Split to search (same split: self excluded)."),
    ks: Optional[List[int]] = typer.Option(None, "--ks", help="Cut-offs for P@k and R@k, e.g. 1 5 10."),
    index: str = typer.Option("flat", "--index", help="flat (exact), ivf or hnsw (approximate)."),
    text: bool = typer.Option(False, "--text", help="Image-text retrieval of a captioned split (--query and "
                                                    "--gallery the same): recall@k both ways."),
    common: Common = None,
) -> None:
    """Image retrieval (relevant = same label): mAP, precision@k, recall@k, MRR.

    With --text: image->text and text->image recall@k of a captioned split's images and captions,
    through the backbone's text tower (CLIP_benchmark's protocol).

    Example:  backbench retrieve -b timm:resnet18@random -d digits --query test --gallery train --ks 1 5 10
    """
    if text:
        return _text_retrieve(common, backbone, dataset, query, gallery, ks)
    if index not in ("flat", "ivf", "hnsw"):
        raise OptionError(f"--index {index!r}: use flat, ivf or hnsw")
    pairs = run_request("retrieval", common, backbone, dataset, {"train": gallery, "eval": query},
                        {"ks": ks, "index": index})
    if emit_records(pairs, common, one=True):
        return
    ((record, reused),) = pairs
    rows = [{"metric": key, "value": value} for key, value in record["metrics"].items() if isinstance(value, float)]
    table(rows, ["metric", "value"], title=f"retrieval {backbone} on {dataset}: {query} -> {gallery}"
          + (" (reused)" if reused else ""))


def _text_retrieve(common: Common, backbone: str, dataset: str, query: str, gallery: str,
                   ks: Optional[List[int]]) -> None:
    """``retrieve --text``: the text-retrieval task on one captioned split."""
    if query != gallery:
        raise OptionError(f"--text searches one captioned split's images and captions: give the same split as "
                          f"--query and --gallery, not {query!r} and {gallery!r}")
    pairs = run_request("text-retrieval", common, backbone, dataset, {"eval": query}, {"ks": ks})
    if emit_records(pairs, common, one=True):
        return
    ((record, reused),) = pairs
    m = record["metrics"]
    rows = [{"k": k, "image_to_text": m[f"image_to_text_R@{k}"], "text_to_image": m[f"text_to_image_R@{k}"]}
            for k in record["params"]["ks"]]
    table(rows, ["k", "image_to_text", "text_to_image"],
          title=f"text retrieval {backbone} on {dataset}/{query}: recall@k, {m['n_images']} images, "
                f"{m['n_texts']} captions, mean {m['mean_recall']:.4f}" + (" (reused)" if reused else ""))
