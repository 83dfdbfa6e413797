"""Benchmark results: what one run's result.json becomes in the tables, and the files that hold them.

    runs = [run_record(method, seed, "padim/seed0", result)]        # one record per run (flat metrics)
    results = {"settings": ..., "runs": runs, "summary": summarize(runs)}
    write_results(results, out_dir)                                   # results.json, results.csv, results.md
    results, kind = load_any(folder)                                  # a benchmark folder or a single run folder

The summary tables (`summary_tables`) are shared by results.md and report.html. Nothing here runs a model.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import ScanomalyError

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



def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a benchmark killed mid-write never leaves a truncated results.json


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
    write_json(out_dir / "results.json", results)
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


def single_run_results(run_dir: Path) -> dict:
    """The results of one run folder (a benchmark run's result.json, or a `train` run with its test scores),
    shaped like a benchmark's with one run."""
    if not (Path(run_dir) / "result.json").is_file():  # a run folder made by `train`
        from .runs import train_run_result

        result = train_run_result(run_dir)
    else:
        try:
            result = json.loads((Path(run_dir) / "result.json").read_text())
        except json.JSONDecodeError as exc:
            raise ScanomalyError(f"{Path(run_dir) / 'result.json'}: corrupt result file ({exc})") from None
    method, seed = result.get("method", "?"), result.get("seed", 0)
    runs = [run_record(method, seed, ".", result)]
    return {
        "title": f"{method} on {Path(str(result.get('data', ''))).name}",
        "settings": {"data": result.get("data"), "profile": result.get("profile"), "seeds": [seed],
                     "split_seed": result.get("split_seed"), "precision": result.get("precision"),
                     "device": result.get("device")},
        "split": result.get("split"),
        "runs": runs,
        "summary": summarize(runs),
    }


def load_any(directory) -> tuple[dict, str]:
    """(results, kind) for a benchmark folder ("benchmark") or a single run folder ("run")."""
    d = Path(directory)
    if not d.is_dir():
        raise ScanomalyError(f"{d}: no such folder")
    if (d / "results.json").is_file():
        return load_results(d), "benchmark"
    if (d / "result.json").is_file() or (d / "train_summary.json").is_file():
        return single_run_results(d), "run"
    raise ScanomalyError(f"{d}: neither a benchmark folder (results.json) nor a run folder (result.json, or "
                         "train_summary.json from `train`)")


def markdown_row(r: dict, rule: str = "balanced") -> str:
    t = r["test"][rule]
    return (
        f"| {r['method']} | {r['profile']} | {r['seed']} | {t['auroc']:.3f} [{t['auroc_ci_low']:.3f}, {t['auroc_ci_high']:.3f}] "
        f"| {t['auprc']:.3f} | {t['precision']:.3f} | {t['recall']:.3f} | {t['specificity']:.3f} | {t['f1']:.3f} "
        f"| {r['train_seconds'] / 60:.1f} | {r['scoring_images_per_second']:.0f} | {r['peak_rss_mib']:.0f} |"
    )
