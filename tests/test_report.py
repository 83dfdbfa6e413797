"""The HTML report (report.build_report) and the summary tables it shares with results.md."""

from __future__ import annotations

import shutil

import pytest

from scanomaly.pipeline import run_method
from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.report import build_report
from scanomaly.scores_csv import read_scores_csv
from scanomaly.benchmark import run_benchmark
from scanomaly.results import results_markdown, summarize, summary_tables

from conftest import MeanDetector, make_tiny_tree, registered
from test_benchmark import check_self_contained_html, parse_markdown_tables


class ReportMean(MeanDetector):
    name = "_report_mean"


class ReportOther(MeanDetector):
    name = "_report_other"


@pytest.fixture(autouse=True, scope="module")
def fake_methods():
    with registered(ReportMean, ReportOther):
        yield


FAST = {"n_bootstrap": 20, "progress": False}


def img_alts(parser) -> list:
    return [a.get("alt") for tag, a in parser.attrs if tag == "img"]


def test_single_run_report(tmp_path):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    run = tmp_path / "run"
    result = run_method(ReportMean.name, data, run, profile="tiny", **FAST)
    path = build_report(run)
    assert path == run / "report.html"
    parser = check_self_contained_html(path)
    assert img_alts(parser) == ["ROC curves", "score histograms", "gallery"]
    text = path.read_text()
    assert ReportMean.name in text and f"{result['test']['balanced']['auroc']:.3f}" in text
    assert "Failed" not in text
    out = build_report(run, out=tmp_path / "elsewhere" / "r.html", n_gallery=0)  # no gallery
    assert img_alts(check_self_contained_html(out)) == ["ROC curves", "score histograms"]


def test_report_renders_without_models_or_images(tmp_path, monkeypatch):
    # the report renders what the runs saved: no model is loaded, no image file read
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out = tmp_path / "bench"
    run_benchmark(data, [ReportMean.name, ReportOther.name], out, profile="tiny", seeds=2, **FAST)
    for seed in (0, 1):
        shutil.rmtree(out / ReportMean.name / f"seed{seed}" / "model")
    shutil.rmtree(data)
    monkeypatch.setattr(Detector, "load", lambda *a, **k: pytest.fail("the report loaded a model"))
    parser = check_self_contained_html(build_report(out))
    assert img_alts(parser) == ["ROC curves", "score histograms", "gallery"]
    assert "no heatmaps" not in (out / "report.html").read_text()

    (out / ReportOther.name / "seed0" / "gallery.npz").unlink()  # a run without its saved gallery: noted, not fatal
    text = build_report(out).read_text()
    assert f"{ReportOther.name}: no heatmaps" in text and 'alt="gallery"' in text
    (out / ReportMean.name / "seed0" / "gallery.npz").unlink()  # the ranking method's: no gallery at all
    parser = check_self_contained_html(build_report(out))
    assert img_alts(parser) == ["ROC curves", "score histograms"]
    assert "gallery left out" in (out / "report.html").read_text()


def test_report_of_a_benchmark_where_everything_failed(tmp_path):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out = tmp_path / "bench"
    results = run_benchmark(data, ["nope_a", "nope_b"], out, profile="tiny", **FAST)
    assert all(r["status"] == "failed" for r in results["runs"])
    build_report(out)
    text = (out / "report.html").read_text()
    assert "nope_a" in text and "unknown method" in text and "<img" not in text
    assert "## Failed" in (out / "results.md").read_text()


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(ScanomalyError, match="neither a benchmark folder"):
        build_report(tmp_path)
    with pytest.raises(ScanomalyError, match="no such folder"):
        build_report(tmp_path / "missing")


def _fake_results(metrics_by_method: dict[str, list[dict]], errors: dict[str, str] | None = None) -> dict:
    runs = []
    for m, per_seed in metrics_by_method.items():
        for seed, metrics in enumerate(per_seed):
            runs.append({"method": m, "seed": seed, "status": "ok", "dir": f"{m}/seed{seed}", "metrics": metrics,
                         "error": None})
    for m, error in (errors or {}).items():
        runs.append({"method": m, "seed": 0, "status": "failed", "dir": f"{m}/seed0", "error": error})
    return {"title": "t", "settings": {"seeds": [0, 1]}, "runs": runs, "summary": summarize(runs)}


def test_summary_tables_bold_the_best_per_column():
    results = _fake_results({
        "a": [{"auroc": 0.9, "auprc": 0.5, "train_seconds": 10.0}, {"auroc": 0.8, "auprc": 0.5, "train_seconds": 12.0}],
        "b": [{"auroc": 0.7, "auprc": 0.5, "train_seconds": 3.0}],
    }, errors={"c": "RuntimeError: out of | memory"})
    tables = {title: (header, rows) for title, header, rows in summary_tables(results)}
    header, rows = tables[next(t for t in tables if t.startswith("Detection"))]
    assert header[:5] == ["Method", "Seeds", "AUROC", "AUROC 95% CI", "AUPRC"]
    cells = {row[0][0]: dict(zip(header, row)) for row in rows}
    assert set(cells) == {"a", "b"}  # c failed: listed, not a row
    assert cells["a"]["AUROC"] == ("0.850 ± 0.071", True) and cells["b"]["AUROC"] == ("0.700", False)
    assert cells["a"]["AUPRC"][1] and cells["b"]["AUPRC"][1]  # a tie: both bold
    header, rows = tables["Cost"]
    cells = {row[0][0]: dict(zip(header, row)) for row in rows}
    assert cells["b"]["Train time (s)"] == ("3.0", True)  # lower is better
    md = results_markdown(results)
    parsed = parse_markdown_tables(md)
    assert parsed["Cost"][0] == {"Method": "a", "Train time (s)": "11.0 ± 1.4"}
    assert "- **c** (seed 0): RuntimeError: out of \\| memory" in md

    one = _fake_results({"a": [{"auroc": 0.9}]})
    (_, _, rows), = summary_tables(one)
    assert rows == [[("a", False), ("1", False), ("0.900", False), ("-", False)]]  # one method: nothing bold


def test_saved_gallery_holds_every_test_image_in_test_order(tmp_path):
    import numpy as np

    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    run = tmp_path / "run"
    run_method(ReportMean.name, data, run, profile="tiny", **FAST)
    g = np.load(run / "gallery.npz")
    rows = read_scores_csv(run / "test_scores.csv")
    assert [str(p) for p in g["paths"]] == [r["path"] for r in rows]
    np.testing.assert_allclose(g["scores"], [r["score"] for r in rows])
    assert g["maps"].shape == g["scans"].shape == (len(rows), 16, 16) and g["scans"].dtype == np.uint8
    # the reconstructions of the most and least anomalous images, in the order of recon_rows
    assert g["recons"].shape == (len(g["recon_rows"]), 16, 16) and len(g["recon_rows"]) == min(16, len(rows))
