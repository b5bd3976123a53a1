"""The Python API a notebook calls: every input a parameter, a cache as a path or a :class:`Cache`.

Each task function builds the same :class:`~backbench.tasks.base.TaskRequest` the CLI and the
battle build, runs it through the task registry (reusing a record the results log already
has) and returns a :class:`TaskResult`. Imports are lazy: ``import backbench`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass
class TaskResult:
    """The records one call produced (one per shots x seed for few-shot tasks) and whether each was reused."""

    records: list[dict[str, Any]] = field(default_factory=list)
    reused: list[bool] = field(default_factory=list)

    @property
    def record(self) -> dict[str, Any]:
        """The first record (the only one for single-seed tasks)."""
        return self.records[0]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics", {})

    def to_dict(self) -> dict[str, Any]:
        return {"records": [{**r, "reused": u} for r, u in zip(self.records, self.reused)]}


def _cache(cache: Any, mode: str = "r+"):
    from backbench.store.cache import Cache

    return cache if isinstance(cache, Cache) else Cache(cache, mode=mode)


def run(task: str, backbone: str, dataset: str, *, splits: Mapping[str, str | None],
        params: Mapping[str, Any] | None = None, features: str | None = None, cache: Any = None,
        device: str = "auto", memory_limit: int | str | None = None, force: bool = False,
        complete_only: bool = False) -> TaskResult:
    """Run any registered task (``backbench.tasks.registered()``) by name; see the specific functions below."""
    from backbench.tasks.base import RunOptions, get_task, run_task

    request = get_task(task).request(backbone, dataset, splits, params=params, features=features)
    pairs = run_task(_cache(cache), request, RunOptions(device, memory_limit, force, complete_only))
    return TaskResult([r for r, _ in pairs], [u for _, u in pairs])


def probe(backbone: str, dataset: str, *, train: str, eval: str, val: str | None = None,
          C: Sequence[float] | None = None, shots: Sequence[int] | None = None, seeds: int = 3,
          **options: Any) -> TaskResult:
    """The linear probe (C chosen on ``val``, else a 10 % holdout); with ``shots``, the few-shot probe.

    ``options``: ``features``, ``cache``, ``device``, ``memory_limit``, ``force``, ``complete_only``.
    """
    params = {"C": C, **({"shots": list(shots), "seeds": seeds} if shots else {})}
    return run("fewshot" if shots else "probe", backbone, dataset, splits={"train": train, "eval": eval, "val": val},
               params=params, **options)


def knn(backbone: str, dataset: str, *, train: str, eval: str, k: Sequence[int] | None = None,
        temperature: float = 0.07, shots: Sequence[int] | None = None, seeds: int = 3, **options: Any) -> TaskResult:
    """DINO's weighted kNN vote; with ``shots``, on K train images per class per seed."""
    params = {"k": k, "temperature": temperature, **({"shots": list(shots), "seeds": seeds} if shots else {})}
    return run("knn-fewshot" if shots else "knn", backbone, dataset, splits={"train": train, "eval": eval},
               params=params, **options)


def retrieve(backbone: str, dataset: str, *, query: str, gallery: str, ks: Sequence[int] | None = None,
             index: str = "flat", **options: Any) -> TaskResult:
    """Same-label retrieval of ``query`` images in ``gallery``: mAP, P@k, R@k, MRR."""
    return run("retrieval", backbone, dataset, splits={"train": gallery, "eval": query},
               params={"ks": ks, "index": index}, **options)


def ood(backbone: str, dataset: str, *, train: str, eval: str, ood: Sequence[str] | None = None,
        open_set: Sequence[str] | None = None, scores: Sequence[str] | None = None, **options: Any) -> TaskResult:
    """OOD detection of the ``ood`` sets (``DATASET:SPLIT``) and/or the held-out ``open_set`` classes."""
    return run("ood", backbone, dataset, splits={"train": train, "eval": eval},
               params={"ood": ood, "open_set": open_set, "scores": scores}, **options)


def shift(backbone: str, dataset: str, *, train: str, eval: str, shifted: Sequence[str], **options: Any) -> TaskResult:
    """OOD generalization: the probe fitted on ``train``, scored on ``eval`` and each ``shifted`` set."""
    return run("shift", backbone, dataset, splits={"train": train, "eval": eval}, params={"shifted": list(shifted)},
               **options)


def segment(backbone: str, dataset: str, *, train: str, eval: str, val: str | None = None,
            lr: Sequence[float] | None = None, weight_decay: Sequence[float] | None = None, epochs: int = 20,
            batch_size: int = 16, **options: Any) -> TaskResult:
    """The linear segmentation probe on cached maps (``features`` default ``map``): mIoU, pixel accuracy;
    lr x weight decay chosen on ``val``, else a 10 % holdout of train."""
    params = {"lr": lr, "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size}
    return run("segmentation", backbone, dataset, splits={"train": train, "eval": eval, "val": val}, params=params,
               **options)


def detect(backbone: str, dataset: str, *, train: str, eval: str, lr: float = 3e-3, weight_decay: float = 1e-4,
           epochs: int = 20, batch_size: int = 8, width: int = 64, scales: Sequence[float] | None = None,
           **options: Any) -> TaskResult:
    """The detection probe on cached maps (simple pyramid + FCOS head): COCO box AP, AP50, AP75.
    ``scales``: the pyramid's levels as scales of the map (default 2, 1, 0.5; ViTDet's: 4, 2, 1, 0.5)."""
    params = {"lr": lr, "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "width": width,
              "scales": list(scales) if scales else None}
    return run("detection", backbone, dataset, splits={"train": train, "eval": eval}, params=params, **options)


def cluster(backbone: str, dataset: str, *, eval: str, seeds: int = 3, niter: int = 25,
            points_per_centroid: int = 256, **options: Any) -> TaskResult:
    """Spherical k-means (faiss; k = the classes of ``eval``) once per seed, scored with NMI, ARI and
    V-measure (mean and std over seeds; ranked by NMI, as MIEB); assignments in the record's outcomes."""
    return run("clustering", backbone, dataset, splits={"eval": eval},
               params={"seeds": seeds, "niter": niter, "points_per_centroid": points_per_centroid}, **options)


def zeroshot(backbone: str, dataset: str, *, eval: str, templates: str | Sequence[str] | None = None,
             classnames: Sequence[str] | None = None, **options: Any) -> TaskResult:
    """Zero-shot classification of ``eval`` with the backbone's text tower: top-1, top-5, mean
    per-class recall. ``templates``: ``"openai"`` (CLIP's 80 ImageNet templates, the default),
    ``"simple"`` (7 of them) or a list of templates with ``{c}``. ``classnames``: readable names
    in place of the split's class names, one per class in its order."""
    if templates is not None and not isinstance(templates, str):
        templates = list(templates)
    return run("zeroshot", backbone, dataset, splits={"eval": eval},
               params={"templates": templates, "classnames": list(classnames) if classnames else None}, **options)


def text_retrieval(backbone: str, dataset: str, *, split: str, ks: Sequence[int] | None = None,
                   **options: Any) -> TaskResult:
    """Image-text retrieval of a captioned ``split`` with the backbone's text tower: image->text and
    text->image recall@k (CLIP_benchmark's), ranked by their mean."""
    return run("text-retrieval", backbone, dataset, splits={"eval": split},
               params={"ks": list(ks) if ks else None}, **options)


def extract(backbone: Any, data: Any, *, dataset: str, split: str, cache: Any = None, **options: Any):
    """Extract one (backbone, dataset, split) into the cache; see :func:`backbench.extract.run.extract`."""
    from backbench.extract.run import extract as run_extract

    return run_extract(backbone, data, cache=cache, dataset=dataset, split=split, **options)


def battle(config: Any = None, *, cache: Any = None, memory_limit: int | str | None = None, client: Any = None):
    """Run a battle (a TOML path, a parsed :class:`BattleConfig`, or None for the built-in one);
    on a dask ``client`` when given. The cache: ``cache``, else ``$BACKBENCH_CACHE``, else the config's."""
    from backbench.battle.config import BattleConfig, load_config, resolve_cache
    from backbench.battle.run import run_battle, run_battle_dask

    cfg = config if isinstance(config, BattleConfig) else load_config(config)
    store = _cache(cache if cache is not None and not isinstance(cache, str) else resolve_cache(cache, cfg)[0], "a")
    if client is not None:
        return run_battle_dask(cfg, store, client, memory_limit=memory_limit)
    return run_battle(cfg, store, memory_limit=memory_limit)


def report(cache: Any = None, *, format: str = "markdown", bootstrap: int = 1000, aggregate: str = "zmean",
           seed: int = 0) -> str:
    """The leaderboard of a cache's results as text: ``markdown``, ``csv``, ``json``, ``html`` or
    ``latex``, ranked by ``aggregate`` (zmean, rank or iqm) with 95 % intervals from ``bootstrap``
    resamples of the records' outcomes (0: none), seeded by ``seed``."""
    from backbench.errors import OptionError
    from backbench.report import render
    from backbench.report.cost import cost_table
    from backbench.report.figures import figures
    from backbench.report.leaderboard import build
    from backbench.store.results import ResultsLog

    formats = {"markdown": render.to_markdown, "csv": render.to_csv, "json": render.to_json,
               "latex": render.to_latex, "html": None}
    if format not in formats:
        raise OptionError(f"format {format!r}: use one of {', '.join(formats)}")
    records = ResultsLog(_cache(cache, "r")).records()
    board = build(records, bootstrap=bootstrap, aggregate=aggregate, seed=seed)
    if format == "html":
        return render.to_html(board, figures(board, cost_table(records), formats=("svg",)))
    return formats[format](board)
