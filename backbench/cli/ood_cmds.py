"""OOD detection (ood) and OOD generalization (shift) on cached features."""

from __future__ import annotations

from typing import List, Optional

import typer

from backbench.cli import CacheOpt, FeaturesOpt, JsonOpt, MemoryOpt, app, emit_json, out, table
from backbench.cli.probe_cmds import BackboneOpt, CompleteOpt, DeviceOpt, ForceOpt
from backbench.errors import OptionError


@app.command()
def ood(
    backbone: str = BackboneOpt,
    id_dataset: str = typer.Option(..., "--id-dataset", help="In-distribution dataset."),
    id_train: str = typer.Option(..., "--id-train", help="ID split the scorers fit on."),
    id_test: str = typer.Option(..., "--id-test", help="ID split scored against the OOD sets."),
    ood_sets: Optional[List[str]] = typer.Option(None, "--ood", help="OOD sets as DATASET:SPLIT (several)."),
    open_set: Optional[List[str]] = typer.Option(None, "--open-set", help="Hold out these classes as OOD."),
    scores: Optional[List[str]] = typer.Option(None, "--scores", help="Scores (default: all), e.g. knn energy vim."),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    complete_only: bool = CompleteOpt,
    features: Optional[str] = FeaturesOpt,
    memory_limit: Optional[str] = MemoryOpt,
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """OOD detection: AUROC, AUPR-In/Out, FPR@95 of each score, ID test vs each OOD set.

    Example:  backbench ood -b timm:resnet18@random --id-dataset digits --id-train train --id-test test --ood textures:test
    """
    from backbench.cli.task_cmds import run_request

    if not ood_sets and not open_set:
        raise OptionError("give --ood DATASET:SPLIT (one or more) or --open-set CLASS (one or more)")
    pairs = run_request("ood", cache, backbone, id_dataset, {"train": id_train, "eval": id_test},
                        {"ood": ood_sets, "open_set": open_set, "scores": scores}, features=features, device=device,
                        memory_limit=memory_limit, force=force, complete_only=complete_only)
    if json_:
        return emit_json([{**r, "reused": reused} for r, reused in pairs])
    for rec, reused in pairs:
        rows = [{"score": name, "set": s, **m} for name, sets in rec["metrics"]["scores"].items()
                for s, m in sets.items()]
        table(rows, ["score", "set", "auroc", "aupr_in", "aupr_out", "fpr@95tpr"],
              title=f"{rec['task']} {backbone}: ID {id_dataset}/{id_test}" + (" (reused)" if reused else ""))


def _ref(text: str) -> tuple[str, str]:
    from backbench.probe.ood_tasks import parse_ref

    return parse_ref(text)


@app.command()
def shift(
    backbone: str = BackboneOpt,
    train: str = typer.Option(..., "--train", help="DATASET:SPLIT to fit the probe on."),
    eval_: str = typer.Option(..., "--eval", help="DATASET:SPLIT, in distribution."),
    shifted: List[str] = typer.Option(..., "--shifted", help="DATASET:SPLIT sets with the same (or a subset of) classes."),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    complete_only: bool = CompleteOpt,
    features: Optional[str] = FeaturesOpt,
    memory_limit: Optional[str] = MemoryOpt,
    cache: Optional[str] = CacheOpt,
    json_: bool = JsonOpt,
) -> None:
    """OOD generalization: fit the probe once, report ID accuracy, each shifted accuracy and the gap.

    Example:  backbench shift -b timm:resnet18@random --train digits:train --eval digits:test --shifted digits:shifted
    """
    from backbench.cli.task_cmds import run_request

    (dataset, split), ev = _ref(train), _ref(eval_)
    ((rec, reused),) = run_request("shift", cache, backbone, dataset, {"train": split, "eval": f"{ev[0]}:{ev[1]}"},
                                   {"shifted": [":".join(_ref(s)) for s in shifted]}, features=features,
                                   device=device, memory_limit=memory_limit, force=force, complete_only=complete_only)
    if json_:
        return emit_json({**rec, "reused": reused})
    m = rec["metrics"]
    rows = [{"set": eval_, "top1": m["id_top1"], "gap": 0.0, "classes": "all"}]
    rows += [{"set": k, "top1": v["top1"], "gap": v["gap"], "classes": v["classes"]} for k, v in m["shifted"].items()]
    table(rows, ["set", "top1", "gap", "classes"], title=f"shift {backbone}" + (" (reused)" if reused else ""))
    for k, v in m["shifted"].items():
        if isinstance(v["mapping"], dict):
            out.print(f"{k}: classes matched by name: {v['mapping']}")
