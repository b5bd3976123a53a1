"""Leaderboard aggregation against a hand-computed table, and every rendered format of the report:
the same numbers as ``Leaderboard.to_dict()`` in markdown, CSV, HTML and LaTeX, the figures,
and the ``report`` command."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from backbench.report.leaderboard import build, zscores
from backbench.report.render import figures, to_csv, to_html, to_json, to_latex, to_markdown
from backbench.report.stats import Interval
from tests.conftest import digits_pixels, put_group


def rec(backbone, task, dataset, value, metric="top1", created="2026-01-01", **params):
    return {"task": task, "backbone": backbone, "dataset": dataset, "metrics": {metric: value},
            "params": params, "seed": params.pop("seed", 0) if "seed" in params else 0, "created": created,
            "cache": "x.zarr", "versions": {"backbench": "0.1.0", "torch": "2", "timm": "1"}}


RECORDS = [
    rec("a", "probe", "d1", 0.9), rec("b", "probe", "d1", 0.8), rec("c", "probe", "d1", 0.7),
    rec("a", "retrieval", "d1", 0.2, "mAP"), rec("b", "retrieval", "d1", 0.6, "mAP"),
    rec("c", "retrieval", "d1", 0.5, "mAP"),
    rec("a", "probe", "d2", 0.5), rec("b", "probe", "d2", 0.5), rec("c", "probe", "d2", 0.5),
]


def with_intervals(lb, half: dict[tuple[str, str], float]):
    """``lb`` with the given cell half widths (the :class:`Interval` interface the statistics fill):
    the renderers are checked against these known numbers."""
    for (b, c), h in half.items():
        v = float(lb.values[lb.backbones.index(b), lb.columns.index(c)])
        lb.stats.cells[(b, c)] = Interval(v, v - h, v + h, n=100)
    for b, (rank, low, high) in lb.stats.rank.items():  # the build had nothing to resample: no rank intervals
        lb.stats.rank[b] = (rank, rank if low is None else low, rank if high is None else high)
    for how, per in lb.stats.aggregates.items():
        for b, iv in per.items():
            if iv.low is None:
                per[b] = Interval(iv.value, iv.value - 0.1, iv.value + 0.1)
    lb.stats.score = lb.stats.aggregates[lb.ranked_by]
    if not lb.stats.prob_beats.size:
        a = lb.aggregate
        lb.stats.prob_beats = (a[:, None] > a[None, :]) + 0.5 * (a[:, None] == a[None, :])
        np.fill_diagonal(lb.stats.prob_beats, np.nan)
    return lb


LONG = "timm:vit_small_patch16_224.augreg_in21k_ft_in1k@a_long_tag"


def real_cache(path: str) -> str:
    """A real cache: digits pixels under three backbones (noise 0, 3, 6; the first with a long
    name), each with the linear probe, kNN, retrieval and the few-shot probe (1 and 5 shots, 2
    seeds) run by the tasks themselves, so every record keeps its per-sample outcomes."""
    import backbench

    X, y, parts = digits_pixels()
    for k, (name, noise) in enumerate(((LONG, 0.0), ("fake:b", 3.0), ("fake:c", 6.0))):
        feats = X + np.random.default_rng(k).normal(0, noise, X.shape).astype(np.float32)
        for split, rows in parts.items():
            put_group(path, name, "digits", split, feats[rows], y[rows], backbone_info={"n_params": 1e6 * (k + 1)})
        backbench.probe(name, "digits", train="train", eval="test", val="val", C=[0.1, 1.0], cache=path, device="cpu")
        backbench.knn(name, "digits", train="train", eval="test", cache=path, device="cpu")
        backbench.retrieve(name, "digits", query="test", gallery="train", cache=path, device="cpu")
        backbench.probe(name, "digits", train="train", eval="test", shots=[1, 5], seeds=2, cache=path, device="cpu")
    return path


HALF = {("a", "probe:d1"): 0.021, ("b", "probe:d1"): 0.04, ("c", "probe:d1"): 0.05, ("a", "probe:d2"): 0.01,
        ("b", "retrieval:d1"): 0.03, ("c", "retrieval:d1"): 0.2}


def test_zscores_hand_computed():
    lb = build(RECORDS)
    assert lb.backbones == ["a", "b", "c"] and lb.tasks == ["probe", "retrieval"]
    s = np.sqrt(2 / 3) * 0.1  # population std of (0.9, 0.8, 0.7)
    # probe: d1 z = (+0.1, 0, -0.1)/s ; d2 constant -> 0 ; task z = mean of the two
    np.testing.assert_allclose(lb.task_z[:, 0], np.array([0.1, 0, -0.1]) / s / 2, atol=1e-12)
    r = np.array([0.2, 0.6, 0.5])
    np.testing.assert_allclose(lb.task_z[:, 1], (r - r.mean()) / r.std(), atol=1e-12)
    agg = (lb.task_z[:, 0] + lb.task_z[:, 1]) / 2
    np.testing.assert_allclose(lb.aggregate, agg)
    assert lb.rank.tolist() == [3, 1, 2]  # b: (0 + 0.98)/2; c: (-0.61 + 0.39)/2; a: (0.61 - 1.37)/2
    assert [r["backbone"] for r in lb.rows()] == ["b", "c", "a"]


def test_spearman_between_tasks():
    lb = build(RECORDS)
    # probe order a > b > c, retrieval order b > c > a: d = (2, -1, -1) -> rho = 1 - 6*6/24 = -0.5
    assert lb.spearman[0, 1] == pytest.approx(-0.5)
    assert lb.spearman[0, 0] == pytest.approx(1.0)


def test_zscores_keep_missing_as_nan():
    z = zscores(np.array([[1.0, np.nan], [3.0, 2.0], [5.0, 2.0]]))
    np.testing.assert_allclose(z[:, 0], [-1.224744871, 0, 1.224744871])
    assert np.isnan(z[0, 1]) and z[1, 1] == 0


def test_newest_record_wins_and_fewshot_curves():
    recs = [rec("a", "probe", "d", 0.1, created="2026-01-01"), rec("a", "probe", "d", 0.3, created="2026-02-01")]
    recs += [rec("a", "fewshot", "d", v, shots=k, seed=s) for k, v, s in [(1, 0.2, 0), (1, 0.4, 1), (4, 0.8, 0)]]
    lb = build(recs)
    assert lb.values[0, lb.columns.index("probe:d")] == pytest.approx(0.3)
    assert lb.fewshot["a"] == {1: pytest.approx(0.3), 4: pytest.approx(0.8)}


# --------------------------------------------------------------------------- markdown
def _md_tables(md: str) -> list[list[dict[str, str]]]:
    """Every pipe table of a markdown text as rows of {header: cell}."""
    tables, lines = [], md.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("|---"):
            head = [h.strip() for h in lines[k - 1].strip("|").split("|")]
            rows = []
            for row in lines[k + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(head, (c.strip() for c in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def test_markdown_shows_value_plus_minus_half_width_as_the_json_says():
    lb = with_intervals(build(RECORDS), HALF)
    data = json.loads(to_json(lb))
    board, metrics = _md_tables(to_markdown(lb))[:2]
    assert [r["backbone"] for r in board] == [r["backbone"] for r in data["ranking"]] == ["b", "c", "a"]
    for r in metrics:
        for cell in data["cells"]:
            if cell["backbone"] != r["backbone"]:
                continue
            shown = r[f"{cell['task']}:{cell['dataset']}"]
            if cell["ci_low"] is None:
                assert shown == f"{cell['value']:.3f} ± n/a"  # no outcomes kept: the interval says n/a
            else:
                value, half = (float(x) for x in shown.split(" ± "))
                assert value == pytest.approx(cell["value"], abs=5e-4)
                assert half == pytest.approx((cell["ci_high"] - cell["ci_low"]) / 2, abs=5e-4)
    assert metrics[2]["probe:d1"] == "0.900 ± 0.021"  # a's row, hand-written above
    z = {r["backbone"]: r for r in board}
    assert z["b"]["z:retrieval"] == f"{lb.task_z[1, 1]:+.2f}" and z["b"]["rank"] == "1" and z["b"]["≈ #1"] == "#1"
    assert "z: the backbone's metric minus the column's mean over backbones" in to_markdown(lb)


def test_markdown_spearman_says_why_with_fewer_than_three_backbones():
    md = to_markdown(build([r for r in RECORDS if r["backbone"] != "c"]))
    assert "needs at least 3 backbones" in md
    assert "| probe | – |" not in md and "| task |" not in md  # no grid of dashes
    full = _md_tables(to_markdown(build(RECORDS)))[-1]
    assert full[0] == {"task": "probe", "probe": "+1.00", "retrieval": "-0.50"}


def test_missing_and_na_cells_are_never_blank():
    recs = RECORDS[:-1] + [{**rec("c", "zeroshot", "d1", 0.0), "metrics": {}, "not_applicable": "no text tower"},
                           rec("a", "zeroshot", "d1", 0.3), rec("b", "zeroshot", "d1", 0.4)]
    lb = build(recs, bootstrap=0)
    metrics = _md_tables(to_markdown(lb))[1]
    row = {r["backbone"]: r for r in metrics}["c"]
    assert row["probe:d2"] == "–" and row["zeroshot:d1"] == "n/a"
    assert all(v for r in metrics for v in r.values())
    assert "no intervals (--bootstrap 0)" in to_markdown(lb)


# --------------------------------------------------------------------------- CSV and JSON
def test_csv_round_trips_to_the_json_numbers():
    lb = with_intervals(build(RECORDS), HALF)
    data = json.loads(to_json(lb))
    rows = {r["backbone"]: r for r in csv.DictReader(io.StringIO(to_csv(lb)))}
    assert list(rows) == ["b", "c", "a"]
    assert list(csv.reader(io.StringIO(to_csv(lb))))[0][:5] == ["rank", "backbone", "rank_low", "rank_high", "z_mean"]
    for cell in data["cells"]:
        r, col = rows[cell["backbone"]], f"{cell['task']}:{cell['dataset']}"
        assert float(r[col]) == pytest.approx(cell["value"])
        for end in ("ci_low", "ci_high"):
            assert (r[f"{col} {end}"] == "") if cell[end] is None else float(r[f"{col} {end}"]) == pytest.approx(cell[end])
    for entry in data["ranking"]:
        r = rows[entry["backbone"]]
        assert int(r["rank"]) == entry["rank"] and int(r["rank_low"]) == entry["rank_low"]
        assert float(r["z_mean"]) == pytest.approx(entry["value"]) and float(r["z_mean_ci_high"]) == pytest.approx(entry["ci_high"])


def test_csv_reads_into_pandas_as_one_row_per_backbone():
    pd = pytest.importorskip("pandas")
    lb = with_intervals(build(RECORDS), HALF)
    frame = pd.read_csv(io.StringIO(to_csv(lb)), index_col="backbone")
    assert frame.loc["a", "probe:d1 ci_low"] == pytest.approx(0.9 - 0.021)
    assert frame["rank"].tolist() == [1, 2, 3]


def test_json_carries_the_statistics_sections():
    data = json.loads(to_json(build(RECORDS)))
    assert data["rows"][0]["rank"] == 1 and data["provenance"][0]["cache"] == "x.zarr"
    assert {"ranking", "cells", "pairwise", "stability"} <= set(data)
    assert data["pairwise"]["friedman"]["blocks"] == 3


# --------------------------------------------------------------------------- LaTeX
def _latex_rows(tex: str) -> list[list[list[str]]]:
    """Each tabular's body rows split into cells (the structure a compiler would see)."""
    out = []
    for body in re.findall(r"\\midrule\n(.*?)\\bottomrule", tex, re.S):
        out.append([[c.strip() for c in line.removesuffix(r"\\").split(" & ")] for line in body.strip().splitlines()])
    return out


def test_latex_is_structurally_sound_escaped_and_marks_best_and_ties():
    recs = [{**r, "backbone": r["backbone"] + "_net#1"} for r in RECORDS]
    lb = build(recs)
    with_intervals(lb, {(b + "_net#1", c): h for (b, c), h in HALF.items()})
    tex = to_latex(lb)
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 3  # leaderboard, probe, retrieval
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 3 and tex.count(r"\toprule") == 3
    assert tex.count("{") == tex.count("}") + tex.count(r"\{") - tex.count(r"\}")
    assert r"a\_net\#1" in tex and "a_net#1" not in tex.replace(r"a\_net\#1", "")
    for table in _latex_rows(tex):
        assert len({len(r) for r in table}) == 1  # every row has as many cells as the header
    board, probe, retrieval = _latex_rows(tex)
    assert board[0][0].startswith("1") and r"\textbf{$+$0.49}" in board[0][2]  # #1's aggregate in bold
    by_name = {r[0]: r for r in probe}
    assert by_name[r"a\_net\#1"][1].startswith(r"\textbf{0.900}")  # best on d1
    # b (0.80 ± 0.04: up to 0.84) does not reach a's interval (0.879..0.921): not underlined
    assert r"\underline" not in by_name[r"b\_net\#1"][1]
    assert all(r[2].startswith(r"\textbf{0.500}") for r in probe)  # a tie for best: all bold
    rb = {r[0]: r for r in retrieval}
    # retrieval: b 0.6 ± 0.03 best, c 0.5 ± 0.2 overlaps it: underlined (the overlap rule, said in the caption)
    assert rb[r"b\_net\#1"][1].startswith(r"\textbf{0.600}") and rb[r"c\_net\#1"][1].startswith(r"\underline{0.500}")
    assert "overlap rule" in tex


# --------------------------------------------------------------------------- HTML and figures
class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.captions, self.scroll, self.text = [], 0, [], 0, []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        self.tables += tag == "table"
        self.scroll += tag == "div" and a.get("class") == "scroll"
        self._in_caption = tag == "figcaption"

    def handle_endtag(self, tag):
        self._in_caption = self._in_caption and tag != "figcaption"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_caption:
            self.captions.append(data)


COST = {"a": {"n_params": 1e6, "gflops": 0.3}, "b": {"n_params": 2e6, "gflops": 1.2}}


def test_html_is_self_contained_with_svg_figures_and_captions():
    lb = with_intervals(build(RECORDS + [rec("a", "fewshot", "d1", 0.5, shots=2)]), HALF)
    figs = figures(lb, COST)
    assert {"aggregate", "task_scores", "zscore_heatmap", "task_correlation", "critical_difference",
            "fewshot_curves", "score_vs_cost"} <= set(figs)
    page = to_html(lb, figs)
    parser = _Collect()
    parser.feed(page)
    assert len(parser.imgs) == len(figs) and parser.tables == parser.scroll >= 6  # every table scrolls in its box
    for src in parser.imgs:
        assert src.startswith("data:image/svg+xml;base64,")
        assert b"<svg" in base64.b64decode(src.split(",", 1)[1])
    assert all(len(c.split()) > 8 and "_" not in c for c in parser.captions)  # sentences, not file names
    text = "".join(parser.text)
    assert "0.900 ± 0.021" in text and "z: the backbone's metric minus" in text and "Friedman test" in text
    assert "removing `retrieval` changes the order" in text and "P(row ranks above column)" in text
    assert "Task correlation" in text and "Provenance" in text
    assert "http" not in page.replace("http-equiv", "")
    assert "<script>" in page and "sortable" in page


def test_html_keeps_the_correlation_table_with_a_note_for_two_backbones():
    lb = build([r for r in RECORDS if r["backbone"] != "c"])
    figs = figures(lb)
    assert "task_correlation" in figs.skipped and "critical_difference" not in figs.skipped
    page = to_html(lb, figs)
    assert "Task correlation" in page and "needs at least 3 backbones" in page and "Not drawn: task correlation" in page


def test_figures_encode_svg_png_at_300_dpi_and_pdf(tmp_path):
    from PIL import Image

    from backbench.report.figures import write_figures

    lb = build(RECORDS + [rec("a", "fewshot", "d1", v, shots=k) for k, v in ((1, 0.3), (5, 0.6))])
    figs = figures(lb, COST, formats=("png", "pdf"))
    pngs = write_figures(figs, tmp_path, "png")
    pdfs = write_figures(figs, tmp_path, "pdf")
    assert len(pngs) == len(pdfs) == len(figs)
    for p in pngs:
        with Image.open(p) as im:
            assert round(im.info["dpi"][0]) == 300
            assert 1000 < im.size[0] <= 6.6 * 300  # at most 6.5 in at 300 dpi, trimmed to its contents
    assert all(p.read_bytes()[:5] == b"%PDF-" for p in pdfs)


def test_fewshot_axis_is_labelled_by_the_real_shot_counts():
    import matplotlib

    matplotlib.use("Agg")
    from backbench.report import plots
    from backbench.report.plots import style

    lb = build(RECORDS + [rec(b, "fewshot", "d1", v, shots=k) for b in "ab" for k, v in ((1, 0.3), (5, 0.6))])
    fig, caption = plots.fewshot_curves(lb, style(lb))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5"] and ax.get_xscale() == "log"
    assert "labelled images per class" in caption


def test_cost_axes_are_parameters_and_gflops_not_images_per_second():
    import matplotlib

    matplotlib.use("Agg")
    from backbench.report import plots
    from backbench.report.plots import style

    lb = build(RECORDS)
    fig, _ = plots.score_vs_cost(lb, style(lb), cost=COST)
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert labels == ["parameters (log scale)", "forward GFLOPs per image (log scale)"]
    assert all(ax.get_xlim()[0] > 0 for ax in fig.axes)  # no negative cost
    fig, _ = plots.score_vs_cost(lb, style(lb), cost={"a": {"n_params": 1e6, "gflops": None}})
    assert [ax.get_xlabel() for ax in fig.axes] == ["parameters (log scale)"]  # no GFLOPs counted: one panel


# --------------------------------------------------------------------------- the command
def test_report_command_formats_and_usage_errors(tmp_path, run_cli):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    code, out, err = run_cli("report", "--records", str(path), "--json", "--bootstrap", "50")
    assert code == 0, err
    data = json.loads(out)
    assert data["statistics"]["bootstrap"] == 50 and data["ranking"][0]["backbone"] == "b"
    code, out, err = run_cli("report", "--records", str(path), "--aggregate", "rank", "--format", "json")
    assert code == 0 and json.loads(out)["statistics"]["aggregate"] == "rank"
    code, out, err = run_cli("report", "--records", str(path), "--aggregate", "best")
    assert code == 2 and "--aggregate 'best'" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("report", "--records", str(path), "--format", "latex", "-o", str(tmp_path / "t.tex"),
                             "--pdf", str(tmp_path / "pdf"), "--png", str(tmp_path / "png"))
    assert code == 0, err
    assert (tmp_path / "t.tex").read_text().count(r"\begin{table}") == 3
    assert (tmp_path / "pdf" / "aggregate.pdf").exists() and (tmp_path / "png" / "task_scores.png").exists()
    code, out, err = run_cli("report", "--records", str(path), "--bootstrap", "0")
    assert code == 0 and "rank 95%" in out and "no intervals (--bootstrap 0)" in out


def test_terminal_tables_show_plus_minus_and_rank_intervals(tmp_path, run_cli):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    code, out, err = run_cli("report", "--records", str(path))
    assert code == 0, err
    assert "± n/a" in out and "rank 95%" in out and "Friedman test" in out  # old records: n/a, not an error


def test_a_real_cache_reports_intervals_in_every_format(cache_path, run_cli, tmp_path):
    """Records with outcome arrays in a real cache: every cell has an interval around its value,
    and markdown, CSV and HTML show the numbers the JSON has."""
    real_cache(cache_path)
    code, out, err = run_cli("report", "--cache", cache_path, "--json", "--bootstrap", "200")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["cells"]) == 12 and all(c["ci_low"] <= c["value"] <= c["ci_high"] for c in data["cells"])
    assert all(c["n"] and c["ci_low"] < c["ci_high"] for c in data["cells"])
    assert data["ranking"][0]["backbone"] == LONG and data["ranking"][0]["rank_low"] == 1
    assert set(data["fewshot_bands"][LONG]) == {"1", "5"}
    code, out, err = run_cli("report", "--cache", cache_path, "--format", "csv", "--bootstrap", "200")
    rows = {r["backbone"]: r for r in csv.DictReader(io.StringIO(out))}
    for c in data["cells"]:
        col = f"{c['task']}:{c['dataset']}"
        assert float(rows[c["backbone"]][f"{col} ci_high"]) == pytest.approx(c["ci_high"])
    code, out, err = run_cli("report", "--cache", cache_path, "--format", "html", "--bootstrap", "200",
                             "-o", str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    probe = next(c for c in data["cells"] if c["backbone"] == "fake:b" and c["task"] == "probe")
    assert f"{probe['value']:.3f} ± {(probe['ci_high'] - probe['ci_low']) / 2:.3f}" in page
    assert 'id="fig-critical_difference"' in page and 'id="fig-fewshot_curves"' in page
