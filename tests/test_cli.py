"""The scanomaly CLI end to end, with a tiny fake method registered only in this module."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from scanomaly import cli
from scanomaly.cli import main
from scanomaly.data import UNKNOWN
from scanomaly.options import parse_value

from conftest import MeanDetector, registered


class MixedMeanDetector(MeanDetector):
    name = "_test_mean_mixed"
    needs_unlabeled = True


@dataclass
class BareConfig:
    width: int = 4


class BareDetector(MeanDetector):
    name = "_test_bare"
    Config = BareConfig
    profiles = {"cpu": {"preprocessing": {"image_size": 16}}}


@pytest.fixture(autouse=True, scope="module")
def fake_methods():
    """Register the fake methods for this module only, so other tests never see them."""
    with registered(MeanDetector, MixedMeanDetector, BareDetector):
        yield


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------
def test_info_text_and_json(tiny_tree, capsys):
    (tiny_tree / "train" / "normal" / "zz_bad.png").write_bytes(b"not a png")
    code, out, _ = run(capsys, "info", tiny_tree, "--no-progress")
    assert code == 0
    assert "train" in out and "test" in out and "PNG" in out and "32x32" in out
    assert "unreadable (1)" in out and "zz_bad.png" in out
    code, out, _ = run(capsys, "info", tiny_tree, "--json")
    info = json.loads(out)
    assert info["counts"]["train"] == {"normal": 7, "abnormal": 6, "unknown": 0, "total": 13}
    assert info["sizes"] == {"32x32": 24} and len(info["unreadable"]) == 1


def test_bad_path_is_exit_2_without_traceback(tmp_path, capsys):
    code, out, err = run(capsys, "info", tmp_path / "missing")
    assert code == 2 and err.startswith("error:") and "missing" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "info", tmp_path / "empty")
    assert code == 2 and "no images found" in err


def test_usage_errors_return_codes(capsys):
    assert main(["--version"]) == 0
    assert main([]) == 2
    assert main(["evaluate"]) == 2  # argparse: missing argument
    capsys.readouterr()


def test_keyboard_interrupt_is_130(monkeypatch, tiny_tree, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    code, _, err = run(capsys, "info", tiny_tree)
    assert code == 130 and "interrupted" in err


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------
def write_scores(path, rows, header=("path", "score")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_evaluate_with_data_folder(tiny_tree, tmp_path, capsys):
    from scanomaly.data import discover

    recs = [r for r in discover(tiny_tree) if r.split == "test"]
    scores = write_scores(tmp_path / "s.csv", [(r.path, r.label + 0.1 * i) for i, r in enumerate(recs)])
    code, out, err = run(capsys, "evaluate", scores, "--data", tiny_tree, "--n-bootstrap", 50,
                         "--out", tmp_path / "m.json")
    assert code == 0, err
    assert "AUROC" in out and "oracle" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 12 and m["n_abnormal"] == 6 and m["threshold_source"] == "oracle (same data)"
    assert 0 <= m["auroc"] <= 1 and m["n_unmatched"] == 0


def test_evaluate_label_column_and_validation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    rows = [(f"/img/{i}.png", float(v), int(t)) for i, (v, t) in enumerate(zip(rng.normal(size=40) + y, y))]
    scores = write_scores(tmp_path / "s.csv", rows, ("path", "score", "label"))
    val = write_scores(tmp_path / "v.csv", rows[:20], ("path", "score", "label"))
    code, out, err = run(capsys, "evaluate", scores, "--val-scores", val, "--threshold-rule", "max_f1",
                         "--n-bootstrap", 20, "--out", tmp_path / "m.json")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["threshold_source"] == "validation" and m["threshold_rule"] == "max_f1"
    assert "oracle" not in out


def test_evaluate_labels_manifest_and_per_patient(tmp_path, capsys):
    rows, manifest = [], ["path,label,patient_id"]
    for p in range(6):
        for k in range(3):
            label = int(p % 2 == 1 and k == 0)
            manifest.append(f"img/p{p}_{k}.png,{label},P{p}")
            rows.append((str(tmp_path / f"img/p{p}_{k}.png"), label + 0.01 * k))
    (tmp_path / "labels.csv").write_text("\n".join(manifest) + "\n")
    scores = write_scores(tmp_path / "s.csv", rows)
    code, out, err = run(capsys, "evaluate", scores, "--labels", tmp_path / "labels.csv", "--per-patient", "max",
                         "--n-bootstrap", 20, "--out", tmp_path / "m.json")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["patient"]["n"] == 6 and m["patient"]["auroc"] == 1.0 and "patient (max)" in out


def test_evaluate_without_labels_is_an_error(tmp_path, capsys):
    scores = write_scores(tmp_path / "s.csv", [("/a.png", 0.1), ("/b.png", 0.2)])
    code, _, err = run(capsys, "evaluate", scores)
    assert code == 2 and "label" in err
    code, _, err = run(capsys, "evaluate", tmp_path / "nope.csv")
    assert code == 2 and err.startswith("error:")


# ------------------------------------------------------------------------------------------
# train / score with the fake method
# ------------------------------------------------------------------------------------------
def test_train_healthy_then_score_with_heatmaps(tiny_tree, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "_test_mean", "--healthy", tiny_tree / "train" / "normal",
                         "--out", run_dir, "--iters", 3, "--seed", 1, "--set", "gain=2.5", "--set", "tag=abc",
                         "--set", "center_crop=false", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (run_dir / "model" / "model.json").is_file()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["method"] == "_test_mean" and summary["counts"]["healthy"] == 6
    assert summary["config"] == {"iterations": 3, "batch_size": 8, "seed": 1, "gain": 2.5, "tag": "abc"}
    assert summary["preprocessing"]["center_crop"] is False
    assert MeanDetector.fits[-1]["unlabeled"] is None and MeanDetector.fits[-1]["work_dir"] == run_dir

    (tiny_tree / "test" / "normal" / "zz_bad.png").write_bytes(b"junk")
    out_csv = tmp_path / "scores" / "test.csv"
    code, out, err = run(capsys, "score", run_dir, tiny_tree / "test", "--out", out_csv,
                         "--heatmaps", tmp_path / "maps", "--no-progress", "--device", "cpu")
    assert code == 0, err
    rows = read_csv(out_csv)
    assert len(rows) == 12 and set(rows[0]) >= {"path", "name", "score", "label", "heatmap"}
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(maps) == 12 and not any(p.name.endswith(".png.png") for p in maps)
    skipped = json.loads((tmp_path / "scores" / "test_skipped.json").read_text())
    assert len(skipped) == 1 and "zz_bad.png" in skipped[0]["path"] and "zz_bad.png" in err

    # the scores evaluate against the same folder; abnormal discs score higher
    code, out, err = run(capsys, "evaluate", out_csv, "--data", tiny_tree, "--n-bootstrap", 20,
                         "--out", tmp_path / "m.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["auroc"] > 0.8

    # a model folder works as well as a run folder
    code, _, err = run(capsys, "score", run_dir / "model", tiny_tree / "test" / "abnormal", "--out",
                       tmp_path / "b.csv", "--no-progress", "--device", "cpu")
    assert code == 0, err


def test_train_from_labeled_writes_split_and_val_scores(tiny_tree, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "_test_mean_mixed", "--from-labeled", tiny_tree, "--out", run_dir,
                         "--abnormal-fraction", 0.25, "--holdout-fraction", 0.34, "--no-progress", "--device", "cpu")
    assert code == 0, err
    from scanomaly.splits import read_split_manifest

    split = read_split_manifest(run_dir / "split.csv")
    assert len(split.test) == 12 and split.healthy and split.unlabeled
    fit = MeanDetector.fits[-1]
    assert len(fit["healthy"]) == len(split.healthy)
    assert all(r.label == UNKNOWN for r in fit["unlabeled"].records)  # no labels reach training
    val = read_csv(run_dir / "val_scores.csv")
    assert len(val) == len(split.val) and {r["role"] for r in val} == {"healthy_holdout", "val_abnormal"}
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["split"]["test"]["n"] == 12

    # score the split's test role, then evaluate with the validation threshold
    code, _, err = run(capsys, "score", run_dir, run_dir / "split.csv", "--role", "test", "--out",
                       tmp_path / "t.csv", "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert len(read_csv(tmp_path / "t.csv")) == 12
    code, out, err = run(capsys, "evaluate", tmp_path / "t.csv", "--val-scores", run_dir / "val_scores.csv",
                         "--n-bootstrap", 20, "--out", tmp_path / "m.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["threshold_source"] == "validation"


def test_train_errors(tiny_tree, tmp_path, capsys):
    common = ["--out", tmp_path / "r", "--no-progress", "--device", "cpu"]
    code, _, err = run(capsys, "train", "_test_mean_mixed", "--healthy", tiny_tree / "train" / "normal", *common)
    assert code == 2 and "unlabeled" in err
    code, _, err = run(capsys, "train", "_test_bare", "--healthy", tiny_tree / "train" / "normal", "--iters", 5, *common)
    assert code == 2 and "iterations" in err
    code, _, err = run(capsys, "train", "_test_mean", "--healthy", tiny_tree / "train" / "normal", "--set", "nope=1", *common)
    assert code == 2 and "nope" in err
    code, _, err = run(capsys, "train", "_test_mean", "--healthy", tiny_tree / "train", *common)
    assert code == 2 and "abnormal" in err
    code, _, err = run(capsys, "train", "no_such_method", "--healthy", tiny_tree, *common)
    assert code == 2 and "unknown method" in err
    code, _, err = run(capsys, "train", "_test_mean", "--healthy", tiny_tree, "--profile", "huge", *common)
    assert code == 2 and "profile" in err
    code, _, err = run(capsys, "score", tmp_path / "nothing", tiny_tree, "--out", tmp_path / "s.csv")
    assert code == 2 and err.startswith("error:")


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("True") is True and parse_value("no") is False
    assert parse_value("none") is None and parse_value("[1, 2]") == [1, 2]
    assert parse_value("resnet18") == "resnet18"


# ------------------------------------------------------------------------------------------
# demo and the module entry point
# ------------------------------------------------------------------------------------------
def test_demo_calls_run_demo(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("scanomaly.demo")

    def run_demo(args):
        seen.update(vars(args))
        return 0

    fake.run_demo = run_demo
    monkeypatch.setitem(sys.modules, "scanomaly.demo", fake)
    assert main(["demo", "--out", "somewhere", "--iters", "7", "--device", "cpu"]) == 0
    assert seen["out"] == "somewhere" and seen["iters"] == 7 and seen["device"] == "cpu"


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scanomaly.demo", None)  # import fails
    code, _, err = run(capsys, "demo")
    assert code == 2 and "demo is not available" in err


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scanomaly", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
