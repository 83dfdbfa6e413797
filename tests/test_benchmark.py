"""The multi-method benchmark (benchmark.run_benchmark and `scanomaly benchmark`), end to end on small inputs.

Real methods run with their "tiny" profiles; fast fake methods (registered only in this module)
cover seeds, failures, resume and option routing."""

from __future__ import annotations

import csv
import json
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from scanomaly import benchmark
from scanomaly.cli import main
from scanomaly.detector import available_methods, get_method
from scanomaly.errors import ScanomalyError
from scanomaly.splits import read_split_manifest
from scanomaly.benchmark import run_benchmark
from scanomaly.report import build_report
from scanomaly.options import method_overrides
from scanomaly.results import TABLES

from conftest import MeanDetector, make_tiny_tree, registered

FAST = {"n_bootstrap": 30, "progress": False}


# ------------------------------------------------------------------------------------------
# fake methods
# ------------------------------------------------------------------------------------------
class SuiteMean(MeanDetector):
    name = "_suite_mean"
    profiles = {"tiny": {"preprocessing": {"image_size": 16}}, "cpu": {"preprocessing": {"image_size": 16}}}


class SuiteBroken(SuiteMean):
    name = "_suite_broken"

    def fit(self, healthy, unlabeled=None, **kwargs):
        raise RuntimeError("boom: this method always fails")


@pytest.fixture(autouse=True, scope="module")
def fake_methods():
    with registered(SuiteMean, SuiteBroken):
        yield


def one_class_method() -> str:
    """A real one-class method with a tiny profile (fast ones first), else the fake one."""
    names = available_methods()
    for m in ("padim", "patchcore", "ganomaly", "alocc", "fanogan", "anogan", "alad"):
        if m in names and "tiny" in get_method(m).profiles and not get_method(m).needs_unlabeled:
            return m
    return SuiteMean.name


# ------------------------------------------------------------------------------------------
# parsing helpers
# ------------------------------------------------------------------------------------------
class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))


def check_self_contained_html(path) -> Tags:
    text = path.read_text(encoding="utf-8")
    parser = Tags()
    parser.feed(text)
    parser.close()
    assert "html" in parser.tags and "table" in parser.tags
    srcs = [a["src"] for tag, a in parser.attrs if "src" in a]
    assert srcs, "no embedded images"
    assert all(s.startswith("data:image/png;base64,") for s in srcs), "an image is not embedded"
    assert not any(tag in ("script", "link") for tag in parser.tags)
    assert not any(a.get("href", "").startswith(("http", "//", "file:")) for _, a in parser.attrs)
    import base64

    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in srcs)
    return parser


def parse_markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{section title: [{header: cell}]} for every markdown table under a '## ' heading."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:].strip(), None
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[title] = []
            elif not set("".join(cells)) <= set("-: "):
                tables[title].append(dict(zip(header, cells)))
    return tables


def parse_cell(cell: str) -> tuple[float, float | None, bool]:
    bold = cell.startswith("**") and cell.endswith("**")
    m = re.fullmatch(r"([-\d.]+)(?: ± ([-\d.]+))?", cell.strip("*"))
    assert m, f"not a 'mean ± std' cell: {cell!r}"
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), bold


def check_markdown_matches_json(out_dir) -> None:
    results = json.loads((out_dir / "results.json").read_text())
    tables = parse_markdown_tables((out_dir / "results.md").read_text())
    summary = results["summary"]
    shown = [m for m, s in summary.items() if s["n_ok"]]
    for title, columns in TABLES:
        if not any(key in summary[m]["metrics"] for m in shown for _, key, _, _ in columns):
            assert title not in tables
            continue
        rows = {r["Method"]: r for r in tables[title]}
        assert sorted(rows) == sorted(shown)
        for header, key, better, dec in columns:
            if not any(key in summary[m]["metrics"] for m in shown):
                continue
            means = {m: round(summary[m]["metrics"][key]["mean"], dec) for m in shown}
            best = (max if better == "max" else min)(means.values())
            for m in shown:
                mean, std, bold = parse_cell(rows[m][header])
                stat = summary[m]["metrics"][key]
                assert mean == pytest.approx(stat["mean"], abs=0.6 * 10**-dec), (title, header, m)
                if stat["std"] is None:
                    assert std is None
                else:
                    assert std == pytest.approx(stat["std"], abs=0.6 * 10**-dec)
                assert bold == (len(shown) > 1 and means[m] == best), (title, header, m)
    if any(s["n_failed"] for s in summary.values()):
        failed_section = (out_dir / "results.md").read_text().split("## Failed", 1)[1]
        for m, s in summary.items():
            for e in s["errors"]:
                assert f"**{m}**" in failed_section and e["error"].split(":")[0] in failed_section


# ------------------------------------------------------------------------------------------
# a real benchmark on a tiny synthetic tree (shared by several tests)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, fake_methods):
    root = tmp_path_factory.mktemp("suite")
    data = make_tiny_tree(root / "data", n=12, size=32)
    methods = ["healthygan", one_class_method(), SuiteBroken.name]
    out = root / "bench"
    results = run_benchmark(data, methods, out, profile="tiny", seeds=1, **FAST)
    build_report(out)  # as `scanomaly benchmark` does after the runs
    return data, out, methods, results


def test_benchmark_trains_every_method_on_one_split(tiny_bench):
    data, out, methods, results = tiny_bench
    for name in ("split.csv", "results.json", "results.csv", "results.md", "report.html"):
        assert (out / name).is_file(), name
    shared = (out / "split.csv").read_text()
    split = read_split_manifest(out / "split.csv")
    assert len(split.test) == 24 and all(r.split == "test" for r in split.test)  # the official test split
    by_method = {r["method"]: r for r in results["runs"]}
    assert list(by_method) == methods
    for m in methods[:2]:
        run = by_method[m]
        assert run["status"] == "ok" and run["dir"] == f"{m}/seed0"
        assert (out / m / "seed0" / "split.csv").read_text() == shared
        result = json.loads((out / m / "seed0" / "result.json").read_text())
        assert result["split"]["test"]["n"] == 24 and result["split"]["healthy"]["n"] == len(split.healthy)
        assert (out / m / "seed0" / "model" / "model.safetensors").is_file()
        assert 0.0 <= run["metrics"]["auroc"] <= 1.0 and run["metrics"]["train_seconds"] > 0
        assert run["metrics"]["balanced_threshold"] is not None and run["metrics"]["max_f1_f1"] is not None
        assert run["metrics"]["peak_rss_mib"] > 0 and run["metrics"]["scoring_images_per_second"] > 0
    assert results["settings"]["methods"] == methods and results["settings"]["seeds"] == [0]


def test_failing_method_is_recorded_and_others_continue(tiny_bench):
    _, out, methods, results = tiny_bench
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    assert [r["method"] for r in failed] == [SuiteBroken.name]
    assert "RuntimeError: boom" in failed[0]["error"]
    assert "Traceback" in (out / SuiteBroken.name / "seed0" / "error.txt").read_text()
    assert results["summary"][SuiteBroken.name]["n_failed"] == 1
    assert "boom" in (out / "results.md").read_text().split("## Failed")[1]
    assert "boom" in (out / "report.html").read_text()
    rows = list(csv.DictReader(open(out / "results.csv", newline="")))
    assert [(r["method"], r["status"]) for r in rows] == [(methods[0], "ok"), (methods[1], "ok"), (methods[2], "failed")]
    assert float(rows[0]["auroc"]) == pytest.approx(results["runs"][0]["metrics"]["auroc"])


def test_markdown_table_matches_results_json(tiny_bench):
    _, out, _, _ = tiny_bench
    check_markdown_matches_json(out)


def test_report_is_one_self_contained_html_file(tiny_bench):
    _, out, methods, _ = tiny_bench
    parser = check_self_contained_html(out / "report.html")
    alts = [a.get("alt") for tag, a in parser.attrs if tag == "img"]
    assert alts == ["ROC curves", "score histograms", "gallery"]
    text = (out / "report.html").read_text()
    assert "healthygan" in text and methods[1] in text and "no heatmaps" not in text


def test_resume_skips_finished_runs(tiny_bench, monkeypatch):
    data, out, methods, first = tiny_bench
    calls = []
    real = benchmark.run_method

    def counting(method, *args, **kwargs):
        calls.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_method", counting)
    again = run_benchmark(data, methods, out, profile="tiny", seeds=1, **FAST)
    assert calls == [SuiteBroken.name]  # only the unfinished (failed) run is tried again
    assert [r["resumed"] for r in again["runs"]] == [True, True, False]
    for a, b in zip(first["runs"][:2], again["runs"][:2]):
        assert a["metrics"] == b["metrics"]
    # other settings in the same folder: refused, nothing run
    with pytest.raises(ScanomalyError, match="other settings"):
        run_benchmark(data, methods, out, profile="cpu", seeds=1, **FAST)
    assert calls == [SuiteBroken.name]


# ------------------------------------------------------------------------------------------
# fast tests with the fake method
# ------------------------------------------------------------------------------------------
def test_seeds_give_mean_and_std_and_one_class_training_sets(tmp_path):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    MeanDetector.fits.clear()
    results = run_benchmark(data, SuiteMean.name, tmp_path / "b", profile="tiny", seeds=3, **FAST)
    split = read_split_manifest(tmp_path / "b" / "split.csv")
    assert [(f["seed"], f["n"]) for f in MeanDetector.fits] == [(0, len(split.healthy)), (1, len(split.healthy)),
                                                                (2, len(split.healthy))]
    aurocs = [r["metrics"]["auroc"] for r in results["runs"]]
    stat = results["summary"][SuiteMean.name]["metrics"]["auroc"]
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(np.mean(aurocs))
    assert stat["std"] == pytest.approx(np.std(aurocs, ddof=1))
    check_markdown_matches_json(tmp_path / "b")
    assert " ± " in (tmp_path / "b" / "results.md").read_text()

    # the ceiling: one-class methods train on every training normal
    MeanDetector.fits.clear()
    run_benchmark(data, [SuiteMean.name], tmp_path / "c", profile="tiny", seeds=1, one_class_train="all_normals", **FAST)
    n_normals = len(split.healthy) + len(split.healthy_holdout) + sum(r.label == 0 for r in split.unlabeled)
    assert [(f["seed"], f["n"]) for f in MeanDetector.fits] == [(0, n_normals)] and n_normals > len(split.healthy)


def test_interrupted_benchmark_resumes_where_it_stopped(tmp_path, monkeypatch):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out = tmp_path / "b"
    real, calls = benchmark.run_method, []

    def interrupted_at_seed_1(method, data, out_dir, **kwargs):
        calls.append(kwargs["seed"])
        if kwargs["seed"] == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # Ctrl-C: not a method failure, it stops the benchmark
        return real(method, data, out_dir, **kwargs)

    monkeypatch.setattr(benchmark, "run_method", interrupted_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(data, SuiteMean.name, out, profile="tiny", seeds=3, **FAST)
    saved = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["status"]) for r in saved["runs"]] == [(0, "ok")]
    results = run_benchmark(data, SuiteMean.name, out, profile="tiny", seeds=3, **FAST)
    assert calls == [0, 1, 1, 2]
    assert [(r["seed"], r["status"], r["resumed"]) for r in results["runs"]] == [(0, "ok", True), (1, "ok", False),
                                                                                 (2, "ok", False)]
    # a run folder trained on another split is never mixed in
    lines = (out / SuiteMean.name / "seed2" / "split.csv").read_text().splitlines()
    (out / SuiteMean.name / "seed2" / "split.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ScanomalyError, match="another split"):
        run_benchmark(data, SuiteMean.name, out, profile="tiny", seeds=3, **FAST)


def test_set_options_are_checked_per_run(tmp_path, monkeypatch):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out, pair = tmp_path / "b", [SuiteMean.name, SuiteBroken.name]
    run_benchmark(data, SuiteMean.name, out, profile="tiny", config_overrides={"gain": 2.0}, **FAST)
    recorded = json.loads((out / SuiteMean.name / "seed0" / "options.json").read_text())
    assert recorded == {"config": {"gain": 2.0}, "preprocessing": {}}

    # an option scoped to a method that has not run yet may be added: the finished run is kept
    calls = []
    real = benchmark.run_method
    monkeypatch.setattr(benchmark, "run_method", lambda m, *a, **k: calls.append((m, k["config_overrides"])) or real(m, *a, **k))
    both = {"gain": 2.0, f"{SuiteBroken.name}.iterations": 3}
    results = run_benchmark(data, pair, out, profile="tiny", config_overrides=both, **FAST)
    assert calls == [(SuiteBroken.name, {"gain": 2.0, "iterations": 3})]
    assert [r["resumed"] for r in results["runs"]] == [True, False]
    text = (out / "results.md").read_text()
    assert f"Options set (`--set`): gain=2.0 for every method; {SuiteBroken.name} also iterations=3." in text

    # an option that changes a run already trained: refused before anything runs
    with pytest.raises(ScanomalyError, match="other --set options"):
        run_benchmark(data, pair, out, profile="tiny", config_overrides={"gain": 5.0}, **FAST)
    assert len(calls) == 1

    # a run folder from before options.json existed is judged by results.json, and gets its record
    (out / SuiteMean.name / "seed0" / "options.json").unlink()
    with pytest.raises(ScanomalyError, match="other --set options"):
        run_benchmark(data, SuiteMean.name, out, profile="tiny", config_overrides={"gain": 5.0}, **FAST)
    run_benchmark(data, SuiteMean.name, out, profile="tiny", config_overrides={"gain": 2.0}, **FAST)
    assert json.loads((out / SuiteMean.name / "seed0" / "options.json").read_text()) == recorded
    assert len(calls) == 1


def test_unknown_method_fails_alone(tmp_path):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    results = run_benchmark(data, f"no_such_method,{SuiteMean.name}", tmp_path / "b", profile="tiny", **FAST)
    build_report(tmp_path / "b")
    status = {r["method"]: (r["status"], r["error"]) for r in results["runs"]}
    assert status[SuiteMean.name] == ("ok", None)
    assert status["no_such_method"][0] == "failed" and "unknown method" in status["no_such_method"][1]
    check_self_contained_html(tmp_path / "b" / "report.html")


def test_set_options_reach_the_right_methods():
    methods = [SuiteMean.name, SuiteBroken.name, "padim"]
    overrides = {"gain": 3.0, f"{SuiteBroken.name}.iterations": 7, "preprocessing.image_size": 24, "channels": 1}
    config, prep = method_overrides(SuiteMean.name, overrides, {"top_crop": 0.1}, methods)
    assert config == {"gain": 3.0} and prep == {"top_crop": 0.1, "image_size": 24, "channels": 1}
    config, _ = method_overrides(SuiteBroken.name, overrides, None, methods)
    assert config == {"gain": 3.0, "iterations": 7}


def test_cli_benchmark_and_report(tmp_path, capsys):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", data, "--methods", f"{SuiteMean.name},{SuiteBroken.name}", "--profile", "tiny",
            "--seeds", "2", "--out", out, "--set", "gain=2.5", "--n-bootstrap", "20", "--no-progress",
            "--one-class-train", "healthy", "--device", "cpu"]
    code = main([str(a) for a in argv])
    printed, err = capsys.readouterr()
    assert code == 1  # a run failed: reported, and the exit status says so
    assert "| Method |" in printed and "boom" in printed and "2 of 4 run(s) failed" in err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["config_overrides"] == {"gain": 2.5}
    model = json.loads((out / SuiteMean.name / "seed1" / "model" / "model.json").read_text())
    assert model["config"]["gain"] == 2.5 and model["config"]["seed"] == 1
    check_self_contained_html(out / "report.html")

    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    check_self_contained_html(out / "report.html")
    assert main(["report", str(out / SuiteMean.name / "seed0")]) == 0  # one run
    check_self_contained_html(out / SuiteMean.name / "seed0" / "report.html")
    capsys.readouterr()

    assert main(["report", str(tmp_path / "data")]) == 2
    assert "neither a benchmark folder" in capsys.readouterr().err
    code = main(["benchmark", "--data", str(data), "--methods", SuiteMean.name, "--out", str(tmp_path / "x"),
                 "--set", "no_such_option=1", "--profile", "tiny"])
    assert code == 2 and "no_such_option" in capsys.readouterr().err
    code = main(["benchmark", "--data", str(data), "--methods", SuiteMean.name, "--out", str(tmp_path / "x"),
                 "--set", f"{SuiteMean.name}.seed=3"])
    assert code == 2 and "seed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# a few dozen real chest X-rays
# ------------------------------------------------------------------------------------------
def test_benchmark_on_real_chest_xrays(data_root, tmp_path):
    src = data_root / "chest_xray_pneumonia"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    data = tmp_path / "chest"
    for split, cls, n in (("train", "normal", 16), ("train", "abnormal", 8), ("test", "normal", 8), ("test", "abnormal", 8)):
        files = sorted((src / split / cls).glob("*.png"))[:n]
        if len(files) < n:
            pytest.skip(f"{src / split / cls} holds fewer than {n} PNGs")
        (data / split / cls).mkdir(parents=True)
        for f in files:
            os.symlink(f, data / split / cls / f.name)
    methods = ["healthygan", one_class_method()]
    results = run_benchmark(data, methods, tmp_path / "bench", profile="tiny", seeds=1, **FAST)
    assert [r["status"] for r in results["runs"]] == ["ok", "ok"], [r["error"] for r in results["runs"]]
    assert results["split"]["test"] == {"n": 16, "normal": 8, "abnormal": 8, "patients": 0}
    assert results["split"]["healthy"]["n"] + results["split"]["healthy_holdout"]["n"] == 8
    check_markdown_matches_json(tmp_path / "bench")
    parser = check_self_contained_html(build_report(tmp_path / "bench"))
    assert [a.get("alt") for tag, a in parser.attrs if tag == "img"] == ["ROC curves", "score histograms", "gallery"]


def test_failed_run_may_be_retried_with_other_options(tmp_path, monkeypatch):
    data = make_tiny_tree(tmp_path / "data", n=12, size=16)
    out = tmp_path / "b"
    first = run_benchmark(data, SuiteBroken.name, out, profile="tiny",
                          config_overrides={"gain": 2.0}, **FAST)
    assert first["runs"][0]["status"] == "failed"
    run_dir = out / SuiteBroken.name / "seed0"
    assert (run_dir / "split.csv").is_file()  # it got as far as its folder, but trained nothing

    # nothing to resume, so other options are fine: it runs again under them
    again = run_benchmark(data, SuiteBroken.name, out, profile="tiny",
                          config_overrides={"gain": 3.0}, **FAST)
    assert again["runs"][0]["status"] == "failed" and again["runs"][0]["resumed"] is False
    assert json.loads((run_dir / "options.json").read_text())["config"] == {"gain": 3.0}

    # a checkpoint in the folder means training had started: other options are refused again
    (run_dir / "train").mkdir()
    (run_dir / "train" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ScanomalyError, match="other --set options"):
        run_benchmark(data, SuiteBroken.name, out, profile="tiny", config_overrides={"gain": 4.0}, **FAST)
