"""The bundled demo and the single-method benchmark runner, end to end on small inputs."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from scanomaly.pipeline import run_method
from scanomaly.results import markdown_row
from scanomaly.cli import main
from scanomaly.demo import demo_data_dir, run_demo
from scanomaly.splits import read_split_manifest

from conftest import make_tiny_tree


def test_bundled_demo_sample_is_complete_and_licensed():
    root = demo_data_dir()
    counts = {(s, c): len(list((root / s / c).glob("*.png"))) for s in ("train", "test") for c in ("normal", "abnormal")}
    assert counts == {("train", "normal"): 200, ("train", "abnormal"): 60, ("test", "normal"): 50, ("test", "abnormal"): 50}
    source = (root / "SOURCE.md").read_text()
    assert "CC BY 4.0" in source and "Kermany" in source


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    import scanomaly.demo as demo

    scales, original = [], demo.save_heatmap_panel

    def recording_panel(*args, **kwargs):
        scales.append((kwargs.get("vmin"), kwargs.get("vmax")))
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "save_heatmap_panel", recording_panel)
    out = tmp_path / "demo"
    assert run_demo(SimpleNamespace(out=str(out), iters=4, device="cpu", no_progress=True)) == 0
    printed = capsys.readouterr().out
    # every panel on one colour scale; what it says it wrote is what it wrote
    assert len(scales) == 8 and len(set(scales)) == 1 and None not in scales[0]
    assert "4 most and 4 least anomalous" in printed
    assert (out / "report.html").is_file() and str(out / "report.html") in printed
    # the scores CSV has the columns of `scanomaly score`
    from scanomaly.scores_csv import SCORE_COLUMNS

    assert (out / "test_scores.csv").read_text().splitlines()[0].split(",") == list(SCORE_COLUMNS)
    assert "AUROC" in printed or "auroc" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["split"]["test"]["n"] == 100
    assert 0.0 <= result["test"]["balanced"]["auroc"] <= 1.0
    assert result["test"]["balanced"]["threshold_source"] == "validation"
    assert len(list((out / "heatmaps").glob("*.png"))) == 8
    assert (out / "test_scores.csv").read_text().count("\n") == 101


def test_demo_cli_verb(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "d"), "--iters", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "d" / "model" / "model.safetensors").is_file()


def test_run_method_trains_and_reuses_its_split(tmp_path):
    data = make_tiny_tree(tmp_path / "data", n=12, size=32)
    for method in ("healthygan",):
        r = run_method(method, data, tmp_path / method, profile="tiny", progress=False)
        split = read_split_manifest(tmp_path / method / "split.csv")
        assert r["split"]["test"]["n"] == len(split.test) == 24
        t = r["test"]["balanced"]
        assert 0 <= t["auroc_ci_low"] <= t["auroc"] <= t["auroc_ci_high"] <= 1
        assert markdown_row(r).startswith(f"| {method} | tiny | 0 |")
        # a second run in the same folder reuses the split file exactly
        again = run_method(method, data, tmp_path / method, profile="tiny", progress=False)
        assert again["split"] == r["split"]


def test_checkpoint_analysis_scores_every_snapshot(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_analysis.py"
    spec = importlib.util.spec_from_file_location("checkpoint_analysis", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = make_tiny_tree(tmp_path / "data", n=12, size=32)
    run_method("healthygan", data, tmp_path / "run", profile="tiny", config_overrides={"keep_snapshots": True}, progress=False)
    rows = module.checkpoint_analysis(tmp_path / "run")
    assert [row["step"] for row in rows] == [10, 20]
    assert all(row["aucp"] is not None and 0 <= row["test_auroc"] <= 1 for row in rows)


def test_paired_difference_against_another_method_on_the_same_scans():
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))  # the script imports its siblings' helpers
    try:
        spec = importlib.util.spec_from_file_location("healthygan_fused_score", bench / "healthygan_fused_score.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(40)]
    noise = rng.normal(size=80)
    same = module.paired_difference(y, [noise], noise, n_bootstrap=200)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["share_ahead"] == 0  # the same scores never lead
    better = module.paired_difference(y, [y + 0.3 * noise, y + 0.3 * rng.normal(size=80)], noise, n_bootstrap=200)
    # two models that separate the classes against one at chance: ahead in every resample, by about 0.5
    assert better["difference"] > 0.3 and better["ci"][0] > 0 and better["share_ahead"] == 1.0
    assert better["n"] == [40, 40]
