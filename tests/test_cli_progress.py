"""Progress as the user sees it: extraction rates from one clock, a battle without a terminal
printing one line per finished cell as it goes (issue 18: 18)."""

from __future__ import annotations

import re
import time

from backbench.extract.datasets import Digits

RESNET = "timm:test_resnet@random"


class _SlowDigits(Digits):
    """Digits that take 10 ms an image to load, so batches, not set-up, dominate the time."""

    def load(self, index: int):
        time.sleep(0.01)
        return super().load(index)


def test_progress_rate_starts_with_extractions_clock_and_ends_on_its_rate(cache_path):
    from backbench.cli.cache_cmds import _LazyBar
    from backbench.extract.run import extract

    seen: list[tuple[int, int, str]] = []
    with _LazyBar("x") as bar:

        def progress(done: int, total: int) -> None:
            bar(done, total)
            seen.append((done, total, bar.bar.tasks[0].fields["rate"]))

        res = extract(RESNET, _SlowDigits("test"), cache=cache_path, dataset="d", split="test", workers=0,
                      limit=64, batch_size=16, progress=progress)
        bar.finish(res.images_per_s)
        final = bar.bar.tasks[0].fields["rate"]
    assert seen[0] == (0, 64, "-")  # the bar's clock starts where extraction's does, before any batch
    assert [d for d, _, _ in seen[1:]] == [16, 32, 48, 64]
    rates = [float(r) for _, _, r in seen[1:]]
    # 10 ms an image: about 100 images/s all along; never the first batch over a near-zero interval
    assert 0.5 * res.images_per_s <= min(rates) and max(rates) <= 2 * res.images_per_s, (rates, res.images_per_s)
    assert final == f"{res.images_per_s:.1f}"


def test_extract_bar_and_final_line_print_the_same_rate(cache_path, run_cli):
    code, out, err = run_cli("extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "test",
                             "--cache", cache_path, "--limit", "48", "--batch-size", "16", "--workers", "0")
    assert code == 0, err
    bar_rate = re.findall(r"([\d.]+) img/s", err)  # without a terminal the bar prints once, when it stops
    line_rate = re.search(r"\(([\d.]+) img/s\)", out).group(1)
    assert bar_rate == [line_rate], (err, out)


def test_battle_without_a_terminal_prints_a_line_per_finished_cell(tmp_path, run_cli):
    from backbench.battle.config import load_config
    from backbench.battle.run import plan

    config = tmp_path / "b.toml"
    config.write_text(f'backbones = ["{RESNET}"]\nworkers = 0\n'
                      '[datasets.digits]\nsource = "digits"\nsplits = ["train", "test"]\nlimit = 40\n'
                      '[tasks.knn]\nk = [5]\n[tasks.probe]\nC = [1.0]\n')
    cells = plan(load_config(config))
    code, out, err = run_cli("battle", str(config), "--cache", str(tmp_path / "b.zarr"))
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if re.match(r"\[\d+/\d+\] ", ln)]
    assert len(lines) == len(cells) == 4
    for i, (line, cell) in enumerate(zip(lines, cells), 1):
        assert line.startswith(f"[{i}/{len(cells)}] {cell.label}: done in "), line
    assert "cells: 4 done" in out
