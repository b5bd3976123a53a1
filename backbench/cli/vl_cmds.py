"""Vision-language commands: ``zeroshot`` (class-name prompts through the backbone's text tower)
on cached image embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from backbench.cli import app, table
from backbench.cli.probe_cmds import BackboneOpt, DatasetOpt
from backbench.cli.task_cmds import Common, emit_records, run_request, task_command
from backbench.errors import OptionError


@app.command()
@task_command
def zeroshot(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    eval_: str = typer.Option(..., "--eval", help="Split scored (its class names become the prompts)."),
    templates: Optional[str] = typer.Option(None, "--templates", help="openai (CLIP's 80 ImageNet templates, the "
                                                                       "default), simple (7 of them), or a file of "
                                                                       "templates, one a line, with {c} where the "
                                                                       "class name goes."),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="A file of readable class names, one a "
                                                                         "line, in the order of the split's classes "
                                                                         "(default: the names as stored)."),
    common: Common = None,
) -> None:
    """Zero-shot classification with the backbone's text tower: top-1, top-5, mean per-class recall.

    The class names of --eval in every template, through the backbone's own tokenizer and text
    tower (open_clip: models, hf: CLIP and SigLIP), averaged per class and cached in the store;
    images are its cached embeddings (extract the split first).

    Example:  backbench zeroshot -b open_clip:ViT-B-32/openai -d pets --eval test
    """
    from backbench.extract.text import TEMPLATE_SETS, read_templates

    given = templates if templates is None or templates in TEMPLATE_SETS else read_templates(Path(templates))
    names = None
    if classnames is not None:
        try:
            names = [s.strip() for s in classnames.read_text(encoding="utf-8").splitlines() if s.strip()]
        except OSError as exc:
            raise OptionError(f"--classnames {str(classnames)!r} cannot be read ({type(exc).__name__})") from None
    params = {"templates": given, "classnames": names}
    pairs = run_request("zeroshot", common, backbone, dataset, {"eval": eval_}, params)
    if emit_records(pairs, common, one=True):
        return
    rows = [{**{k: r["metrics"][k] for k in ("top1", "top5", "mean_per_class_recall", "n")},
             "templates": r["params"]["n_templates"], "reused": reused} for r, reused in pairs]
    table(rows, ["top1", "top5", "mean_per_class_recall", "n", "templates", "reused"],
          title=f"zero-shot {backbone} on {dataset}/{eval_}")
