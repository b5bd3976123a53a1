"""Dense commands: ``segment`` (linear segmentation probe) and ``detect`` (detection probe) on
cached feature maps (``extract --features map``) and the dense labels stored beside them."""

from __future__ import annotations

from typing import List, Optional

import typer

from backbench.cli import app, table
from backbench.cli.probe_cmds import BackboneOpt, DatasetOpt
from backbench.cli.task_cmds import Common, emit_records, run_request, task_command


@app.command()
@task_command
def segment(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    train: str = typer.Option(..., "--train", help="Split the head is fitted on."),
    eval_: str = typer.Option(..., "--eval", help="Split it is scored on (mIoU at full resolution)."),
    val: Optional[str] = typer.Option(None, "--val", help="Split that chooses lr x weight decay (else a 10 % "
                                                          "holdout of train)."),
    lr: Optional[List[float]] = typer.Option(None, "--lr", help="Learning rates to try (default 0.001 0.003 0.01)."),
    weight_decay: Optional[List[float]] = typer.Option(None, "--weight-decay",
                                                       help="Weight decays to try (default 0.0001 0.01)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over train per fit."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Maps per step."),
    common: Common = None,
) -> None:
    """Linear segmentation probe (DINOv2's BN + 1x1 conv) on cached maps: mIoU, pixel accuracy.

    Reads the `map` kind (or the map kind --features names) of each split and the masks stored
    beside it by `backbench extract --features map` of a source with masks.

    Example:  backbench segment -b timm:resnet18@random -d shapes --train train --eval test
    """
    params = {"lr": lr, "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size}
    pairs = run_request("segmentation", common, backbone, dataset, {"train": train, "eval": eval_, "val": val},
                        params)
    if emit_records(pairs, common, one=True):
        return
    rows = [{"miou": r["metrics"]["miou"], "pixel_acc": r["metrics"]["pixel_acc"],
             "mean_acc": r["metrics"].get("mean_acc"), "lr": r["chosen"]["lr"],
             "weight_decay": r["chosen"]["weight_decay"], "selection": r["chosen"]["selection"], "reused": reused}
            for r, reused in pairs]
    table(rows, ["miou", "pixel_acc", "mean_acc", "lr", "weight_decay", "selection", "reused"],
          title=f"segmentation {backbone} on {dataset}: train {train}, eval {eval_}")
    record = pairs[0][0]
    ious = record["metrics"].get("per_class_iou") or []
    table([{"class": c, "iou": v if v is not None else "n/a"} for c, v in zip(record["metrics"]["classes"], ious)],
          ["class", "iou"], title="per-class IoU (n/a: the class is in neither labels nor predictions)")


@app.command()
@task_command
def detect(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    train: str = typer.Option(..., "--train", help="Split the pyramid and head are trained on."),
    eval_: str = typer.Option(..., "--eval", help="Split scored with COCO box AP."),
    lr: float = typer.Option(3e-3, "--lr", min=0.0, help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", min=0.0, help="AdamW weight decay."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over train (a fixed schedule)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Maps per step."),
    width: int = typer.Option(64, "--width", help="Channels of the pyramid and head (a multiple of 32)."),
    scales: Optional[List[float]] = typer.Option(None, "--scales", help="Pyramid levels as scales of the map "
                                                                         "(default 2 1 0.5; ViTDet's: 4 2 1 0.5)."),
    common: Common = None,
) -> None:
    """Detection probe on cached maps (simple feature pyramid + FCOS head): COCO box AP, AP50, AP75.

    A frozen-backbone probe, comparable across backbones; not a fine-tuned detector's numbers.

    Example:  backbench detect -b timm:resnet18@random -d shapes --train train --eval test
    """
    params = {"lr": lr, "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "width": width,
              "scales": scales}
    pairs = run_request("detection", common, backbone, dataset, {"train": train, "eval": eval_}, params)
    if emit_records(pairs, common, one=True):
        return
    rows = [{**{k: r["metrics"][k] for k in ("ap", "ap50", "ap75", "n")}, "reused": reused} for r, reused in pairs]
    table(rows, ["ap", "ap50", "ap75", "n", "reused"], title=f"detection {backbone} on {dataset}: train {train}, "
                                                            f"eval {eval_}")
