"""OOD detection (ood) and OOD generalization (shift) on cached features."""

from __future__ import annotations

import warnings
from typing import List, Optional

import typer

from backbench.cli import app, out, table
from backbench.cli.probe_cmds import BackboneOpt
from backbench.cli.task_cmds import Common, emit_records, run_request, task_command
from backbench.errors import BackbenchWarning, OptionError


def _renamed(new: Optional[str], old: Optional[str], new_flag: str, old_flag: str, said: list[str]) -> Optional[str]:
    """``new``, or the value given under an old spelling (noted in ``said``: it works for one more release)."""
    if old is not None:
        if new is not None and new != old:
            raise OptionError(f"give {new_flag} once (not also {old_flag})")
        said.append(f"{old_flag} is now {new_flag}")
    return new if new is not None else old


def _note_renamed(said: list[str]) -> None:
    if said:
        warnings.warn(f"{'; '.join(said)} (as in probe and knn); the old spelling still works in this release",
                      BackbenchWarning, stacklevel=2)


def _required(value: Optional[str], flag: str) -> str:
    if not value:
        raise OptionError(f"missing option {flag}")
    return value


@app.command()
@task_command
def ood(
    backbone: str = BackboneOpt,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="In-distribution dataset."),
    train: Optional[str] = typer.Option(None, "--train", help="ID split the scorers fit on."),
    eval_: Optional[str] = typer.Option(None, "--eval", help="ID split scored against the OOD sets."),
    ood_sets: Optional[List[str]] = typer.Option(None, "--ood", help="OOD sets as DATASET:SPLIT (several)."),
    open_set: Optional[List[str]] = typer.Option(None, "--open-set", help="Hold out these classes as OOD."),
    scores: Optional[List[str]] = typer.Option(None, "--scores", help="Scores (default: all), e.g. knn energy vim."),
    id_dataset: Optional[str] = typer.Option(None, "--id-dataset", hidden=True),
    id_train: Optional[str] = typer.Option(None, "--id-train", hidden=True),
    id_test: Optional[str] = typer.Option(None, "--id-test", hidden=True),
    common: Common = None,
) -> None:
    """OOD detection: AUROC, AUPR-In/Out, FPR@95 of each score, ID test vs each OOD set.

    Example:  backbench ood -b timm:resnet18@random -d digits --train train --eval test --ood textures:test
    """
    said: list[str] = []
    dataset = _required(_renamed(dataset, id_dataset, "--dataset", "--id-dataset", said), "--dataset / -d")
    train = _required(_renamed(train, id_train, "--train", "--id-train", said), "--train")
    eval_ = _required(_renamed(eval_, id_test, "--eval", "--id-test", said), "--eval")
    if not ood_sets and not open_set:
        raise OptionError("give --ood DATASET:SPLIT (one or more) or --open-set CLASS (one or more)")
    _note_renamed(said)
    pairs = run_request("ood", common, backbone, dataset, {"train": train, "eval": eval_},
                        {"ood": ood_sets, "open_set": open_set, "scores": scores})
    if emit_records(pairs, common):
        return
    for rec, reused in pairs:
        rows = [{"score": name, "set": s, **m} for name, sets in rec["metrics"]["scores"].items()
                for s, m in sets.items()]
        table(rows, ["score", "set", "auroc", "aupr_in", "aupr_out", "fpr@95tpr"],
              title=f"{rec['task']} {backbone}: ID {dataset}/{eval_}" + (" (reused)" if reused else ""))


@app.command()
@task_command
def shift(
    backbone: str = BackboneOpt,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset of the train split."),
    train: str = typer.Option(..., "--train", help="Split to fit the probe on."),
    eval_: str = typer.Option(..., "--eval", help="In-distribution split (or DATASET:SPLIT of another dataset)."),
    shifted: List[str] = typer.Option(..., "--shifted", help="DATASET:SPLIT sets with the same (or a subset of) classes."),
    common: Common = None,
) -> None:
    """OOD generalization: fit the probe once, report ID accuracy, each shifted accuracy and the gap.

    Example:  backbench shift -b timm:resnet18@random -d digits --train train --eval test --shifted digits:shifted
    """
    from backbench.probe.ood_tasks import parse_ref

    if dataset is None and ":" in train:  # the older spelling: --train DATASET:SPLIT
        dataset, train = parse_ref(train)
        _note_renamed(["--train DATASET:SPLIT is now -d DATASET --train SPLIT"])
    dataset = _required(dataset, "--dataset / -d")
    ev = parse_ref(eval_) if ":" in eval_ else (dataset, eval_)
    pairs = run_request("shift", common, backbone, dataset, {"train": train, "eval": f"{ev[0]}:{ev[1]}"},
                        {"shifted": [":".join(parse_ref(s)) for s in shifted]})
    if emit_records(pairs, common, one=True):
        return
    ((rec, reused),) = pairs
    m = rec["metrics"]
    rows = [{"set": f"{ev[0]}:{ev[1]}", "top1": m["id_top1"], "gap": 0.0, "classes": "all"}]
    rows += [{"set": k, "top1": v["top1"], "gap": v["gap"], "classes": v["classes"]} for k, v in m["shifted"].items()]
    table(rows, ["set", "top1", "gap", "classes"], title=f"shift {backbone}" + (" (reused)" if reused else ""))
    for k, v in m["shifted"].items():
        if isinstance(v["mapping"], dict):
            out.print(f"{k}: classes matched by name: {v['mapping']}")
