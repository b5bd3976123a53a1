"""``backbench cluster``: k-means on a split's cached features, scored against its labels (MIEB's protocol)."""

from __future__ import annotations

import typer

from backbench.cli import app, out, table
from backbench.cli.probe_cmds import BackboneOpt, DatasetOpt
from backbench.cli.task_cmds import Common, emit_records, run_request, task_command


@app.command()
@task_command
def cluster(
    backbone: str = BackboneOpt,
    dataset: str = DatasetOpt,
    eval_: str = typer.Option(..., "--eval", help="Split clustered and scored (k = its number of classes)."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="k-means runs, one per seed; the record holds mean and std."),
    niter: int = typer.Option(25, "--niter", min=1, help="Lloyd iterations per run."),
    points_per_centroid: int = typer.Option(256, "--points-per-centroid", min=1,
                                            help="Each run fits on at most this many rows per cluster (a seeded "
                                                 "sample; faiss's default), then assigns every row."),
    common: Common = None,
) -> None:
    """Spherical k-means (faiss) on L2-normalised features, k = the classes: NMI, ARI, V-measure.

    Ranked by NMI, as MIEB ranks its image clustering tasks.

    Example:  backbench cluster -b timm:resnet18@random -d digits --eval test --seeds 5
    """
    params = {"seeds": seeds, "niter": niter, "points_per_centroid": points_per_centroid}
    pairs = run_request("clustering", common, backbone, dataset, {"eval": eval_}, params)
    if emit_records(pairs, common, one=True):
        return
    m = pairs[0][0]["metrics"]
    rows = [{"metric": k, "mean": m[k], "std": m[f"{k}_std"]} for k in ("nmi", "ari", "v_measure", "cluster_acc")]
    table(rows, ["metric", "mean", "std"], title=f"clustering {backbone} on {dataset}/{eval_}")
    out.print(f"k={m['n_clusters']} clusters, n={m['n']} images, {seeds} seed(s); ranked by nmi"
              f"{' (reused record)' if pairs[0][1] else ''}")
