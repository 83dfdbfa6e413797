"""A benchmark of several methods on one labeled data set, by the HealthyGAN protocol.

    results = run_benchmark("data/chest_xray_pneumonia", ["healthygan", "padim"], "bench", seeds=3)

1. The split is built once (`splits.make_healthygan_split`: the official test split where the
   layout has one, a seeded stratified split otherwise) and written to OUT/split.csv. Every method
   and seed reuses it: it is copied into each run folder, where `benchmark.run_method` picks it up.
   HealthyGAN trains on A + B; one-class methods on B (`one_class_train="all_normals"`: on every
   training normal, as a ceiling).
2. Each method is trained and scored once per seed in OUT/<method>/seed<k>/ (`run_method`). A run
   that raises (any Exception, an unknown or uninstalled method included) is recorded as failed,
   with its error, and the others go on. A run folder with a result.json is finished: a second
   call with the same OUT skips it, so an interrupted benchmark resumes (GAN training also resumes
   from its last checkpoint in the run folder).
3. OUT/results.json, OUT/results.csv (one row per method and seed) and OUT/results.md (rows =
   methods, columns = metrics, mean ± std over seeds, best per column in bold) are rewritten after
   every run; OUT/report.html (`report.build_report`) at the end.

Peak memory is the benchmark process's peak resident set size during the run: it is reset before
each run where Linux allows (/proc/self/clear_refs), so runs do not inherit earlier runs' peaks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from .errors import ScanomalyError

ALL_METHODS = ("healthygan", "anogan", "fanogan", "ganomaly", "alad", "alocc", "padim", "patchcore")
ONE_CLASS_TRAIN = ("healthy", "all_normals")

# settings that change every run's results: a resumed benchmark must use the same ones. The --set
# options are checked per run instead (`_check_run_options`): an option for one method that has not
# run yet (`healthygan.preprocessing.top_crop=0`) may be added to a benchmark that is under way.
_RESULT_SETTINGS = ("data", "profile", "split_seed", "abnormal_fraction", "healthy_fraction", "holdout_fraction",
                    "test_fraction", "one_class_train", "precision", "n_bootstrap")
RUN_OPTIONS = "options.json"  # in each run folder: the config / preprocessing options that run got

# flat metrics of one run: (key, where in result.json)
RULES = ("balanced", "max_f1")
_THRESHOLD_KEYS = ("threshold", "precision", "recall", "specificity", "f1", "accuracy")
# localisation (runs on data with pixel masks) and anatomy / patient checks (localization.py):
# (key, where in result.json)
LOCALIZATION_KEYS = (
    ("pixel_auroc", ("localization", "pixel_auroc")),
    ("aupro", ("localization", "aupro")),
    ("dice", ("localization", "dice")),
    ("dice_global", ("localization", "dice_global")),
    ("dice_threshold", ("localization", "dice_threshold")),
    ("pixel_auroc_all", ("localization", "all_pixels", "pixel_auroc")),
    ("aupro_all", ("localization", "all_pixels", "aupro")),
    ("dice_all", ("localization", "all_pixels", "dice")),
    ("slice_matched_auroc", ("slice_matched", "auroc")),
    ("position_bins_auroc", ("slice_matched", "auroc_position_bins")),
    ("slice_matched_n", ("slice_matched", "n")),
    ("slice_matched_n_abnormal", ("slice_matched", "n_abnormal")),
    ("position_only_auroc", ("slice_matched", "position_only_auroc")),
    ("position_only_auroc_matched", ("slice_matched", "position_only_auroc_matched")),
    ("patient_auroc_mean", ("patient_level", "auroc_mean")),
    ("patient_auroc_max", ("patient_level", "auroc_max")),
    ("patient_auroc_topk_mean", ("patient_level", "auroc_topk_mean")),
    ("within_patient_slice_auroc", ("per_patient", "slice_auroc", "mean")),
    ("within_patient_pixel_auroc", ("per_patient", "pixel_auroc", "mean")),
    ("within_patient_dice", ("per_patient", "dice", "mean")),
)
METRIC_KEYS = (
    ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc")
    + tuple(f"{rule}_{k}" for rule in RULES for k in _THRESHOLD_KEYS)
    + ("train_seconds", "scoring_images_per_second", "peak_rss_mib", "peak_gpu_mib")
    + tuple(k for k, _ in LOCALIZATION_KEYS)
)
CSV_COLUMNS = ("method", "seed", "status", "dir") + METRIC_KEYS + ("error",)

# the summary tables: (title, [(header, metric key, "max" | "min" is better, decimals)])
TABLES = (
    ("Detection (threshold: sensitivity ≈ specificity, chosen on validation)", (
        ("AUROC", "auroc", "max", 3),
        ("AUPRC", "auprc", "max", 3),
        ("Precision", "balanced_precision", "max", 3),
        ("Recall", "balanced_recall", "max", 3),
        ("Specificity", "balanced_specificity", "max", 3),
        ("F1", "balanced_f1", "max", 3),
        ("Accuracy", "balanced_accuracy", "max", 3),
    )),
    ("At the max-F1 threshold (chosen on validation)", (
        ("Precision", "max_f1_precision", "max", 3),
        ("Recall", "max_f1_recall", "max", 3),
        ("Specificity", "max_f1_specificity", "max", 3),
        ("F1", "max_f1_f1", "max", 3),
        ("Accuracy", "max_f1_accuracy", "max", 3),
    )),
    ("Localisation (test pixels vs lesion masks; Dice threshold chosen on validation)", (
        ("Pixel AUROC", "pixel_auroc", "max", 3),
        ("AUPRO (FPR ≤ 0.3)", "aupro", "max", 3),
        ("Dice", "dice", "max", 3),
        ("Dice, pooled", "dice_global", "max", 3),
        ("Pixel AUROC, all px", "pixel_auroc_all", "max", 3),
        ("AUPRO, all px", "aupro_all", "max", 3),
        ("Dice, all px", "dice_all", "max", 3),
    )),
    ("Anatomy and patients", (
        ("AUROC, middle third of slice positions", "slice_matched_auroc", "max", 3),
        ("AUROC, pairs in the same tenth of the volume", "position_bins_auroc", "max", 3),
        ("Within-patient slice AUROC", "within_patient_slice_auroc", "max", 3),
        ("Within-patient pixel AUROC", "within_patient_pixel_auroc", "max", 3),
        ("Patient AUROC (mean)", "patient_auroc_mean", "max", 3),
        ("Patient AUROC (max)", "patient_auroc_max", "max", 3),
        ("Patient AUROC (top-3 mean)", "patient_auroc_topk_mean", "max", 3),
    )),
    ("Cost", (
        ("Train time (s)", "train_seconds", "min", 1),
        ("Scoring (images/s)", "scoring_images_per_second", "max", 1),
        ("Peak memory (MiB)", "peak_rss_mib", "min", 0),
        ("Peak GPU memory (MiB)", "peak_gpu_mib", "min", 0),
    )),
)


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------
def parse_methods(methods) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"] (order kept, duplicates dropped)."""
    if isinstance(methods, str):
        methods = methods.split(",")
    out = list(dict.fromkeys(m.strip() for m in methods if m and m.strip()))
    if not out:
        raise ScanomalyError("no methods to benchmark")
    return out


def parse_seeds(seeds) -> list[int]:
    """N -> [0, ..., N-1]; a list of ints is kept as given (duplicates dropped)."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ScanomalyError(f"seeds must be at least 1, got {seeds}")
        return list(range(int(seeds)))
    try:
        out = list(dict.fromkeys(int(s) for s in seeds))
    except (TypeError, ValueError):
        raise ScanomalyError(f"seeds must be a count or a list of integers, got {seeds!r}") from None
    if not out:
        raise ScanomalyError("no seeds given")
    return out


def run_dir_name(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a benchmark killed mid-write never leaves a truncated results.json


def _reset_peak_memory() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0; ru_maxrss follows it) and CUDA's peak counter."""
    ok = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        ok = True
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001 - measuring memory must never break a run
        pass
    return ok


def _peak_gpu_mib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001
        pass
    return None


# ------------------------------------------------------------------------------------------
# --set options: which go to which method
# ------------------------------------------------------------------------------------------
def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _method_class(method: str):
    from .detector import get_method

    try:
        return get_method(method)
    except Exception:  # noqa: BLE001 - an unknown method fails in its own run, not here
        return None


def method_overrides(method: str, config_overrides: dict | None, preprocessing_overrides: dict | None,
                     methods: list[str] | None = None) -> tuple[dict, dict]:
    """The (config, preprocessing) overrides one method gets.

    `config_overrides` keys: "key" goes to every method whose config has that option (or, if it is
    a preprocessing option, to every method's preprocessing); "METHOD.key" to that method only;
    "preprocessing.key" / "METHOD.preprocessing.key" to the preprocessing. `preprocessing_overrides`
    go to every method."""
    from .preprocess import Preprocessing

    methods = methods or []
    cls = _method_class(method)
    config_fields = _field_names(cls.Config) if cls is not None else set()
    prep_fields = _field_names(Preprocessing)
    config, prep = {}, dict(preprocessing_overrides or {})
    for key, value in (config_overrides or {}).items():
        target, name = None, key
        head, _, rest = key.partition(".")
        if rest and head in methods + [method]:
            target, name = head, rest
        if target is not None and target != method:
            continue
        if name.startswith("preprocessing."):
            prep[name.split(".", 1)[1]] = value
        elif name in config_fields or (target is not None and name not in prep_fields):
            config[name] = value  # a wrong METHOD.key fails that method's run with the config's own error
        elif name in prep_fields:
            prep[name] = value
    return config, prep


def check_overrides(methods: list[str], config_overrides: dict | None, preprocessing_overrides: dict | None) -> None:
    """Raise for an option that no method (registered now) and no preprocessing knows."""
    from .preprocess import Preprocessing

    prep_fields = _field_names(Preprocessing)
    for key in preprocessing_overrides or {}:
        if key not in prep_fields:
            raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
    classes = {m: _method_class(m) for m in methods}
    for key in config_overrides or {}:
        if key.rpartition(".")[2] == "seed":
            raise ScanomalyError("the seed is set per run by the benchmark's seeds; it cannot be overridden")
        head, _, rest = key.partition(".")
        if rest and head in methods:
            if classes[head] is None:
                continue  # not registered: its run fails and reports why
            key, targets = rest, [classes[head]]
        else:
            targets = [c for c in classes.values() if c is not None]
        if key.startswith("preprocessing."):
            if key.split(".", 1)[1] not in prep_fields:
                raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
            continue
        if key in prep_fields or any(key in _field_names(c.Config) for c in targets):
            continue
        if not targets:
            continue  # no method registered to check against: their runs report it
        known = sorted(set().union(*(_field_names(c.Config) for c in targets)))
        raise ScanomalyError(f"option {key!r} belongs to none of {', '.join(c.name for c in targets)}; "
                             f"config options: {known}; preprocessing options: {sorted(prep_fields)} "
                             "(METHOD.key sets one method's option)")


# ------------------------------------------------------------------------------------------
# one run -> flat metrics
# ------------------------------------------------------------------------------------------
def flat_metrics(result: dict) -> dict:
    """result.json of one run -> {metric key: value} (METRIC_KEYS)."""
    test = result.get("test", {})
    bal = test.get("balanced", {})
    out = {
        "auroc": bal.get("auroc"),
        "auroc_ci_low": bal.get("auroc_ci_low"),
        "auroc_ci_high": bal.get("auroc_ci_high"),
        "auprc": bal.get("auprc"),
    }
    for rule in RULES:
        t = test.get(rule, {})
        for k in _THRESHOLD_KEYS:
            out[f"{rule}_{k}"] = t.get(k)
    for k in ("train_seconds", "scoring_images_per_second", "peak_rss_mib", "peak_gpu_mib"):
        out[k] = result.get(k)
    for k, where in LOCALIZATION_KEYS:
        v = result
        for part in where:
            v = v.get(part) if isinstance(v, dict) else None
        out[k] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def run_record(method: str, seed: int, rel_dir: str, result: dict | None = None, error: str | None = None,
               seconds: float | None = None, resumed: bool = False, options: dict | None = None) -> dict:
    rec = {"method": method, "seed": seed, "status": "ok" if result is not None else "failed", "dir": rel_dir,
           "resumed": resumed, "seconds": seconds, "error": error, "options": options or {}}
    if result is not None:
        rec["metrics"] = flat_metrics(result)
        rec["profile"] = result.get("profile")
        rec["image_size"] = result.get("image_size")
        rec["device"] = result.get("device")
        if "iterations_per_second" in result:
            rec["iterations_per_second"] = result["iterations_per_second"]
    return rec


def summarize(runs: list[dict], methods: list[str] | None = None) -> dict:
    """Per method: runs ok / failed, errors, and mean / std (sample, ddof=1; None for one seed) of
    every metric over its successful seeds."""
    methods = methods or list(dict.fromkeys(r["method"] for r in runs))
    out = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        ok = [r for r in mine if r["status"] == "ok"]
        metrics = {}
        for k in METRIC_KEYS:
            vals = [r["metrics"].get(k) for r in ok]
            vals = [float(v) for v in vals if v is not None]
            if not vals:
                continue
            metrics[k] = {
                "mean": float(np.mean(vals)),
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "n": len(vals),
            }
        out[m] = {
            "n_runs": len(mine),
            "n_ok": len(ok),
            "n_failed": len(mine) - len(ok),
            "seeds_ok": [r["seed"] for r in ok],
            "errors": [{"seed": r["seed"], "error": r["error"]} for r in mine if r["status"] != "ok"],
            "metrics": metrics,
        }
    return out


# ------------------------------------------------------------------------------------------
# tables (shared by results.md and report.html)
# ------------------------------------------------------------------------------------------
def format_value(stat: dict | None, decimals: int) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{decimals}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std']:.{decimals}f}"
    return text


def summary_tables(results: dict) -> list[tuple[str, list[str], list[list[tuple[str, bool]]]]]:
    """[(title, header, rows)], each cell (text, bold). Rows: methods with at least one successful
    run; bold: the best mean of a column (as displayed, ties all bold) when two or more methods
    have a value."""
    summary = results.get("summary", {})
    methods = [m for m, s in summary.items() if s["n_ok"] > 0]
    tables = []
    for i, (title, columns) in enumerate(TABLES):
        columns = [c for c in columns if any(c[1] in summary[m]["metrics"] for m in methods)]
        if not columns:
            continue
        best = {}
        for _, key, better, dec in columns:
            vals = [round(summary[m]["metrics"][key]["mean"], dec) for m in methods if key in summary[m]["metrics"]]
            if len(vals) >= 2:
                best[key] = max(vals) if better == "max" else min(vals)
        header = ["Method"]
        if i == 0:
            header.append("Seeds")
        header += [c[0] for c in columns]
        if i == 0:
            header.insert(3, "AUROC 95% CI")
        rows = []
        for m in methods:
            s = summary[m]
            row = [(m, False)]
            if i == 0:
                row.append((str(s["n_ok"]) if s["n_failed"] == 0 else f"{s['n_ok']}/{s['n_runs']}", False))
            for _, key, _, dec in columns:
                stat = s["metrics"].get(key)
                bold = stat is not None and key in best and round(stat["mean"], dec) == best[key]
                row.append((format_value(stat, dec), bold))
                if i == 0 and key == "auroc":
                    lo, hi = s["metrics"].get("auroc_ci_low"), s["metrics"].get("auroc_ci_high")
                    ci = f"[{lo['mean']:.3f}, {hi['mean']:.3f}]" if lo and hi else "-"
                    row.append((ci, False))
            rows.append(row)
        tables.append((title, header, rows))
    return tables


def describe_settings(results: dict) -> str:
    st = results.get("settings", {})
    seeds = st.get("seeds", [])
    split = results.get("split") or {}
    test = split.get("test", {})
    val = split.get("val", {})
    text = (f"Data `{st.get('data')}`, profile `{st.get('profile')}`, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
            f"split seed {st.get('split_seed')}.")
    if "one_class_train" in st:
        train = ("every training normal (a ceiling)" if st["one_class_train"] == "all_normals"
                 else "B, the known-healthy set")
        text += f" HealthyGAN trains on A + B; one-class methods on {train}."
    if test:
        text += (f" Test: {test.get('n')} images ({test.get('abnormal')} abnormal); thresholds chosen on "
                 f"validation: {val.get('n')} images ({val.get('abnormal')} abnormal).")
    options = _describe_options(results.get("runs", []))
    if options:
        text += f" Options set (`--set`): {options}."
    return text


def _describe_options(runs: list[dict]) -> str:
    """'a=1 for every method; healthygan also b=2' from the runs' recorded options."""
    per_method = {}
    for r in runs:
        opts = r.get("options") or {}
        items = [f"{k}={v}" for k, v in sorted((opts.get("config") or {}).items())]
        items += [f"preprocessing.{k}={v}" for k, v in sorted((opts.get("preprocessing") or {}).items())]
        per_method.setdefault(r["method"], items)
    if not any(per_method.values()):
        return ""
    common = [i for i in next(iter(per_method.values())) if all(i in v for v in per_method.values())]
    parts = [f"{', '.join(common)} for every method"] if common else []
    parts += [f"{m}{' also' if common else ':'} {', '.join(i for i in v if i not in common)}"
              for m, v in per_method.items() if len(v) > len(common)]
    return "; ".join(parts)


def results_markdown(results: dict) -> str:
    lines = [f"# {results.get('title', 'Benchmark')}", "", describe_settings(results), ""]
    for title, header, rows in summary_tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(f"**{t}**" if b else t for t, b in row) + " |")
        lines.append("")
    if any(s["n_ok"] for s in results.get("summary", {}).values()):
        lines += ["Mean ± standard deviation over seeds (no ± with one seed); best per column in bold. "
                  "AUROC 95% CI: stratified bootstrap interval on the test set (bounds averaged over seeds). "
                  "Thresholds are chosen on the validation split, never on test.", ""]
    from .localization import notes_for_results

    lines += [note + "\n" for note in notes_for_results(results)]
    failed = failures(results)
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- **{m}** ({seeds_text(seeds)}): {_one_line(error)}" for m, seeds, error in failed]
        lines.append("")
    return "\n".join(lines)


def failures(results: dict) -> list[tuple[str, list[int], str]]:
    """[(method, seeds, error)]: the failed runs, seeds with the same error grouped."""
    out: dict = {}
    for m, s in results.get("summary", {}).items():
        for e in s["errors"]:
            out.setdefault((m, str(e["error"])), []).append(e["seed"])
    return [(m, seeds, error) for (m, error), seeds in out.items()]


def seeds_text(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _one_line(text) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def write_results(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    _write_json(out_dir / "results.json", results)
    tmp = out_dir / "results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in results["runs"]:
            m = r.get("metrics", {})
            w.writerow([r["method"], r["seed"], r["status"], r["dir"]]
                       + ["" if m.get(k) is None else repr(float(m[k])) for k in METRIC_KEYS]
                       + [_one_line(r.get("error"))])
    os.replace(tmp, out_dir / "results.csv")
    (out_dir / "results.md").write_text(results_markdown(results))


def load_results(out_dir) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise ScanomalyError(f"{out_dir}: no results.json (not a benchmark folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ScanomalyError(f"{path}: corrupt results file ({exc})") from None


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------
def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _prepare_split(data: Path, out_dir: Path, settings: dict):
    from .data import discover
    from .splits import make_healthygan_split, read_split_manifest, write_split_manifest

    split_csv = out_dir / "split.csv"
    if split_csv.is_file():  # resumed: the split every finished run used
        return read_split_manifest(split_csv)
    split = make_healthygan_split(
        discover(data),
        abnormal_fraction=settings["abnormal_fraction"],
        healthy_fraction=settings["healthy_fraction"],
        holdout_fraction=settings["holdout_fraction"],
        test_fraction=settings["test_fraction"],
        seed=settings["split_seed"],
    )
    write_split_manifest(split, split_csv)
    return split


def _check_resume(out_dir: Path, settings: dict) -> None:
    path = out_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("settings", {})
    except json.JSONDecodeError:
        return
    diff = [k for k in _RESULT_SETTINGS if k in old and json.dumps(old[k], sort_keys=True, default=str)
            != json.dumps(settings[k], sort_keys=True, default=str)]
    if diff:
        detail = "; ".join(f"{k}: {old[k]!r} before, {settings[k]!r} now" for k in diff)
        raise ScanomalyError(f"{out_dir} holds a benchmark run with other settings ({detail}); "
                             "use another output folder, or the same settings to resume it")


def _run_options(method: str, settings: dict) -> dict:
    config, prep = method_overrides(method, settings.get("config_overrides"), settings.get("preprocessing_overrides"),
                                    list(settings.get("methods") or []))
    return {"config": config, "preprocessing": prep}


def _check_run_options(out_dir: Path, todo: list[tuple[str, int]], settings: dict) -> None:
    """Refuse, before anything runs, to resume a run folder under other --set options than it was
    trained with. A folder from before options.json was written is judged by the options in the
    benchmark's earlier results.json, and gets its options.json now."""
    from .training.loop import CHECKPOINT

    old_settings = None
    path = out_dir / "results.json"
    if path.is_file():
        try:
            old_settings = json.loads(path.read_text()).get("settings")
        except json.JSONDecodeError:
            pass
    clashes = []
    for method, seed in todo:
        run_dir = out_dir / run_dir_name(method, seed)
        if not ((run_dir / "result.json").is_file() or any(run_dir.rglob(CHECKPOINT))):
            continue  # nothing trained there yet (never started, or failed before its first checkpoint): any options
        now = _run_options(method, settings)
        recorded_file = run_dir / RUN_OPTIONS
        if recorded_file.is_file():
            recorded = json.loads(recorded_file.read_text())
        elif old_settings is not None:
            recorded = _run_options(method, old_settings)
        else:
            continue  # no record of its options at all: nothing to compare with
        if json.dumps(recorded, sort_keys=True) != json.dumps(now, sort_keys=True):
            clashes.append(f"{run_dir_name(method, seed)}: {recorded} before, {now} now")
        elif not recorded_file.is_file():
            _write_json(recorded_file, recorded)
    if clashes:
        raise ScanomalyError(f"{out_dir} holds runs trained with other --set options ({'; '.join(clashes)}); "
                             "use the same options to resume them, delete those run folders, or use another output folder")


def run_benchmark(
    data,
    methods=ALL_METHODS,
    out_dir="benchmark",
    profile: str = "cpu",
    seeds=1,
    split_seed: int = 0,
    abnormal_fraction: float = 0.3,
    healthy_fraction: float = 0.5,
    holdout_fraction: float = 0.1,
    test_fraction: float = 0.2,
    one_class_train: str = "healthy",
    config_overrides: dict | None = None,
    preprocessing_overrides: dict | None = None,
    device: str = "cpu",
    precision: str = "32",
    n_bootstrap: int = 1000,
    report: bool = True,
    progress: bool = True,
) -> dict:
    """Train and score every method for every seed on one shared HealthyGAN split; see the module
    docstring. Returns the results (as written to OUT/results.json)."""
    from . import __version__
    from .benchmark import run_method  # looked up per call, so tests can patch it
    from .splits import split_counts

    methods = parse_methods(methods)
    seed_list = parse_seeds(seeds)
    if one_class_train not in ONE_CLASS_TRAIN:
        raise ScanomalyError(f"one_class_train must be one of {ONE_CLASS_TRAIN}, got {one_class_train!r}")
    data = Path(os.path.abspath(os.path.expanduser(str(data))))
    if not data.exists():
        raise ScanomalyError(f"{data}: no such file or folder")
    check_overrides(methods, config_overrides, preprocessing_overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "data": str(data),
        "methods": methods,
        "seeds": seed_list,
        "profile": profile,
        "split_seed": split_seed,
        "abnormal_fraction": abnormal_fraction,
        "healthy_fraction": healthy_fraction,
        "holdout_fraction": holdout_fraction,
        "test_fraction": test_fraction,
        "one_class_train": one_class_train,
        "config_overrides": dict(config_overrides or {}),
        "preprocessing_overrides": dict(preprocessing_overrides or {}),
        "device": device,
        "precision": precision,
        "n_bootstrap": n_bootstrap,
        "version": __version__,
    }
    todo = [(m, s) for m in methods for s in seed_list]
    _check_resume(out_dir, settings)
    _check_run_options(out_dir, todo, settings)
    split = _prepare_split(data, out_dir, settings)
    results = {
        "title": f"Benchmark on {data.name}",
        "settings": settings,
        "split": split_counts(split),
        "runs": [],
        "summary": {},
        "files": {"split": "split.csv", "results_json": "results.json", "results_csv": "results.csv",
                  "results_md": "results.md", "report": "report.html"},
    }

    def save():
        results["summary"] = summarize(results["runs"], methods)
        write_results(results, out_dir)

    save()
    for i, (method, seed) in enumerate(todo, start=1):
        rel = run_dir_name(method, seed)
        run_dir = out_dir / rel
        tag = f"[{i}/{len(todo)}] {method} seed {seed}"
        own_split = run_dir / "split.csv"
        if own_split.is_file() and own_split.read_bytes() != (out_dir / "split.csv").read_bytes():
            raise ScanomalyError(f"{run_dir} was trained on another split than {out_dir / 'split.csv'}; "
                                 "delete that run folder (or use another output folder) to run it again")
        options = _run_options(method, settings)
        if (run_dir / "result.json").is_file():
            try:
                result = json.loads((run_dir / "result.json").read_text())
                results["runs"].append(run_record(method, seed, rel, result, resumed=True, options=options))
                _log(progress, f"{tag}: finished before, skipped")
                save()
                continue
            except json.JSONDecodeError:
                pass  # a corrupt result: run it again
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / "split.csv", own_split)  # the one shared split: run_method reuses it
        _write_json(run_dir / RUN_OPTIONS, options)
        config, prep = options["config"], options["preprocessing"]
        _log(progress, f"{tag}: training and scoring in {run_dir}")
        _reset_peak_memory()
        t0 = time.perf_counter()
        try:
            result = run_method(
                method, data, run_dir, profile=profile, seed=seed, split_seed=split_seed,
                abnormal_fraction=abnormal_fraction, config_overrides=config, preprocessing_overrides=prep,
                device=device, precision=precision, one_class_train=one_class_train, progress=progress,
                n_bootstrap=n_bootstrap,
            )
        except Exception as exc:  # noqa: BLE001 - one method's failure must not stop the others
            seconds = time.perf_counter() - t0
            error = f"{type(exc).__name__}: {exc}"
            (run_dir / "error.txt").write_text(traceback.format_exc())
            results["runs"].append(run_record(method, seed, rel, error=error, seconds=seconds, options=options))
            _log(progress, f"{tag}: FAILED after {seconds:.1f} s: {error}")
            save()
            continue
        seconds = time.perf_counter() - t0
        gpu = _peak_gpu_mib()
        if gpu is not None:
            result["peak_gpu_mib"] = gpu
            _write_json(run_dir / "result.json", result)
        if (run_dir / "error.txt").is_file():
            (run_dir / "error.txt").unlink()  # an earlier failure, now fixed
        results["runs"].append(run_record(method, seed, rel, result, seconds=seconds, options=options))
        _log(progress, f"{tag}: AUROC {result['test']['balanced']['auroc']:.3f} ({seconds:.1f} s)")
        save()

    if report:
        try:
            from .report import build_report

            path = build_report(out_dir)
            _log(progress, f"report written to {path}")
        except Exception as exc:  # noqa: BLE001 - the results are written; a report problem must not lose them
            warnings.warn(f"the HTML report could not be built ({type(exc).__name__}: {exc}); "
                          f"rebuild it with `scanomaly report {out_dir}`")
    return results
