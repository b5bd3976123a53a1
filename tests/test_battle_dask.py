"""The battle's cells as tasks on a real dask.distributed LocalCluster: the same records as a
serial run, also when a worker is killed part-way (its task runs again elsewhere), with
each split extracted as two shard tasks."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from backbench.battle.config import parse_config
from backbench.battle.run import run_battle, run_battle_dask
from backbench.store.results import ResultsLog
from backbench.store import Cache

RAW = {
    "backbones": ["timm:test_resnet@random", "timm:test_vit@random"],
    "workers": 0,
    "shards": 2,  # each split's extraction as two dask tasks writing whole chunks
    "batch_size": 32,
    "datasets": {
        "digits": {"source": "digits", "splits": ["train", "test"], "limit": 120},
        "textures": {"source": "textures", "splits": ["test"], "role": "ood", "limit": 40},
    },
    "tasks": {
        "probe": {"C": [0.1, 1.0]},
        "knn": {"k": [5]},
        "ood": {"ood": ["textures:test"], "scores": ["knn", "mahalanobis"]},
    },
}


def _numbers(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)


def _records(cache: Cache) -> dict:
    return {r["key"]: dict(_numbers(r["metrics"])) for r in ResultsLog(cache).records()}


@pytest.mark.slow
def test_local_cluster_with_a_killed_worker_equals_the_serial_battle(tmp_path):
    from dask.distributed import Client, LocalCluster

    import torch

    cfg = parse_config(RAW)
    serial = Cache(str(tmp_path / "serial.zarr"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a dask worker (one thread each): the same float32 sums
    try:
        assert not run_battle(cfg, serial).failed
    finally:
        torch.set_num_threads(threads)
    cache = Cache(str(tmp_path / "dask.zarr"))
    out, killed = [], []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        runner = threading.Thread(target=lambda: out.append(run_battle_dask(cfg, cache, client)))
        runner.start()
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            busy = [addr for addr, tasks in client.processing().items() if tasks and addr in pids]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)  # the nanny starts a fresh worker
                killed.append(busy[0])
            time.sleep(0.05)
        runner.join(timeout=300)
    assert killed and out, "a worker was killed mid-task and the battle still finished"
    summary = out[0]
    assert [r.status for r in summary.results if r.status not in ("done", "reused")] == []
    a, b = _records(serial), _records(cache)
    assert a.keys() == b.keys() and len(a) == 2 * 3
    for key in a:
        assert b[key].keys() == a[key].keys()
        for name, value in a[key].items():
            if name.startswith(("seconds", "time")) or ".seconds" in name:
                continue
            assert b[key][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, name)
