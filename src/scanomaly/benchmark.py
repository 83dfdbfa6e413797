"""A benchmark of several methods on one labeled data set, by the HealthyGAN protocol.

    results = run_benchmark("data/chest_xray_pneumonia", ["healthygan", "padim"], "bench", seeds=3)

1. The split is built once (`splits.make_healthygan_split`: the official test split where the
   layout has one, a seeded stratified split otherwise) and written to OUT/split.csv. Every method
   and seed trains on it (`pipeline.run_method` gets the split itself; each run folder keeps a copy).
   HealthyGAN trains on A + B; one-class methods on B (`one_class_train="all_normals"`: on every
   training normal, as a ceiling).
2. Each method is trained and scored once per seed in OUT/<method>/seed<k>/ (`run_method`). A run
   that raises (any Exception, an unknown or uninstalled method included) is recorded as failed,
   with its error, and the others go on. A run folder with a result.json is finished: a second
   call with the same OUT skips it, so an interrupted benchmark resumes (GAN training also resumes
   from its last checkpoint in the run folder).
3. OUT/results.json, OUT/results.csv (one row per method and seed) and OUT/results.md (rows =
   methods, columns = metrics, mean ± std over seeds, best per column in bold; results.py) are rewritten
   after every run. The report (OUT/report.html, `report.build_report`) renders them; `scanomaly benchmark`
   builds it at the end.

Peak memory is the benchmark process's peak resident set size during the run: it is reset before
each run where Linux allows (/proc/self/clear_refs), so runs do not inherit earlier runs' peaks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import ScanomalyError
from .options import check_overrides, method_overrides
from .pipeline import ONE_CLASS_TRAIN, run_method
from .results import run_record, summarize, write_json, write_results

ALL_METHODS = ("healthygan", "ddad", "anogan", "fanogan", "ganomaly", "alad", "alocc", "padim", "patchcore")

# settings that change every run's results: a resumed benchmark must use the same ones. The --set
# options are checked per run instead (`_check_run_options`): an option for one method that has not
# run yet (`healthygan.preprocessing.top_crop=0`) may be added to a benchmark that is under way.
_RESULT_SETTINGS = ("data", "profile", "split_seed", "abnormal_fraction", "healthy_fraction", "holdout_fraction",
                    "test_fraction", "one_class_train", "precision", "n_bootstrap")
RUN_OPTIONS = "options.json"  # in each run folder: the config / preprocessing options that run got


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
            write_json(recorded_file, recorded)
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
    progress: bool = True,
) -> dict:
    """Train and score every method for every seed on one shared HealthyGAN split; see the module
    docstring. Returns the results (as written to OUT/results.json)."""
    from . import __version__
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
        shutil.copyfile(out_dir / "split.csv", own_split)  # the run's record of the one shared split
        write_json(run_dir / RUN_OPTIONS, options)
        config, prep = options["config"], options["preprocessing"]
        _log(progress, f"{tag}: training and scoring in {run_dir}")
        _reset_peak_memory()
        t0 = time.perf_counter()
        try:
            result = run_method(
                method, data, run_dir, profile=profile, seed=seed, split_seed=split_seed,
                abnormal_fraction=abnormal_fraction, config_overrides=config, preprocessing_overrides=prep,
                device=device, precision=precision, one_class_train=one_class_train, progress=progress,
                n_bootstrap=n_bootstrap, split=split,
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
        if (run_dir / "error.txt").is_file():
            (run_dir / "error.txt").unlink()  # an earlier failure, now fixed
        results["runs"].append(run_record(method, seed, rel, result, seconds=seconds, options=options))
        _log(progress, f"{tag}: AUROC {result['test']['balanced']['auroc']:.3f} ({seconds:.1f} s)")
        save()

    return results
