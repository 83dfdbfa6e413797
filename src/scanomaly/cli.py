"""The `scanomaly` command line.

    scanomaly info DIR_OR_CSV                         what a data folder holds, and what cannot be read
    scanomaly train METHOD --from-labeled DIR --out RUN
    scanomaly score RUN IMAGES --out scores.csv [--heatmaps DIR] [--runtime onnx]
    scanomaly export RUN --format onnx               the scoring network, for ONNX Runtime
    scanomaly evaluate scores.csv --data DIR [--val-scores RUN/val_scores.csv]
    scanomaly demo
    scanomaly benchmark --data DIR --methods healthygan,padim --seeds 3 --out BENCH
    scanomaly report BENCH_OR_RUN                       rebuild report.html from saved results
    scanomaly view SCORES_OR_RUN_OR_BENCH               a local web viewer of the scored scans

User errors print `error: <message>` and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from .data import ABNORMAL, NORMAL, UNKNOWN, ImageRecord, discover, label_text, load_images
from .errors import ImageReadError, ScanomalyError
from .scores_csv import SCORE_COLUMNS, record_key, write_scores_csv  # noqa: F401 - re-exported

# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def _abspath(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _parse_value(text: str):
    """--set values: true/false, none, int, float, a JSON list, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _print_skipped(skipped: list[dict], limit: int = 10) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
    for s in skipped[:limit]:
        where = s["path"] + (f"#{s['index']}" if s.get("index") is not None else "")
        print(f"  {where}: {s['reason']}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# score CSVs
# ------------------------------------------------------------------------------------------
def read_scores_csv(path) -> list[dict]:
    """Rows of a scores CSV: {"path", "index", "score", "label" (int or None), "patient_id"}.
    Relative paths are taken relative to the working folder, or to the CSV's folder when only there."""
    path = Path(path)
    if not path.is_file():
        raise ScanomalyError(f"{path}: no such scores file")
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ScanomalyError(f"{path}: cannot read the scores CSV ({exc})") from None
    if "score" not in cols or not ({"path", "file"} & set(cols)):
        raise ScanomalyError(f"{path}: a scores CSV needs 'path' and 'score' columns (found {cols})")
    from .data import LABEL_NAMES, UNKNOWN_LABEL_NAMES

    out = []
    for i, row in enumerate(rows, start=2):
        raw = (row.get("path") or row.get("file") or "").strip()
        if not raw:
            raise ScanomalyError(f"{path}:{i}: empty path")
        p = Path(raw)
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        try:
            score = float(row["score"])
            index = int(row["index"]) if (row.get("index") or "").strip() else None
        except ValueError:
            raise ScanomalyError(f"{path}:{i}: score must be a number and index an integer") from None
        label_text = (row.get("label") or "").strip().lower()
        if label_text not in LABEL_NAMES and label_text not in UNKNOWN_LABEL_NAMES:
            raise ScanomalyError(f"{path}:{i}: unknown label {label_text!r} (use normal/abnormal or 0/1)")
        out.append({
            "path": str(p),
            "index": index,
            "score": score,
            "label": LABEL_NAMES.get(label_text),
            "patient_id": (row.get("patient_id") or "").strip() or None,
        })
    if not out:
        raise ScanomalyError(f"{path}: no rows")
    return out


def _attach_labels(rows: list[dict], records: list[ImageRecord] | None) -> tuple[list[dict], int]:
    """Labels (and patient ids) for score rows from labeled records, matched by path (and index),
    else by file name when that is unique. Returns (rows with labels, number unmatched)."""
    if records is None:
        return rows, 0
    by_key = {record_key(r.path, r.index): r for r in records}
    by_name: dict = {}
    for r in records:
        by_name.setdefault((Path(r.path).name, r.index), []).append(r)
    out, unmatched = [], 0
    for row in rows:
        rec = by_key.get(record_key(row["path"], row["index"]))
        if rec is None:
            same = by_name.get((Path(row["path"]).name, row["index"]), [])
            rec = same[0] if len(same) == 1 else None
        if rec is None:
            unmatched += 1
            continue
        out.append({**row, "label": rec.label, "patient_id": row["patient_id"] or rec.patient_id})
    return out, unmatched


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    from tqdm.auto import tqdm

    from .io import describe_file, read_image

    source = _abspath(args.source)
    records = discover(source)
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r.split or "-", Counter())[label_text(r.label)] += 1
    paths = list(dict.fromkeys(r.path for r in records))
    formats, modes, sizes = Counter(), Counter(), Counter()
    unreadable, n_images = [], 0
    for p in tqdm(paths, desc="reading", disable=args.no_progress or len(paths) < 200, leave=False):
        try:
            d = describe_file(p)
            if not args.quick:
                images = read_image(p)
                n_images += len(images)
                for im in images:
                    sizes[f"{im.shape[1]}x{im.shape[0]}"] += 1
            else:
                n_images += d["n_images"]
                sizes[d["size"]] += 1
            formats[d["format"]] += 1
            modes[d["mode"]] += 1
        except ImageReadError as exc:
            unreadable.append({"path": p, "reason": exc.reason})
    info = {
        "source": str(source),
        "n_records": len(records),
        "n_files": len(paths),
        "n_images_readable": n_images,
        "counts": {split: {"normal": c["normal"], "abnormal": c["abnormal"], "unknown": c["unknown"],
                           "total": sum(c.values())} for split, c in counts.items()},
        "formats": dict(formats.most_common()),
        "modes": dict(modes.most_common()),
        "sizes": dict(sizes.most_common()),
        "n_patients": len({r.patient_id for r in records if r.patient_id}),
        "n_masks": sum(1 for r in records if r.mask_path),
        "unreadable": unreadable,
        "decoded": not args.quick,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source: {source}")
    print(f"{len(records)} image record(s) in {len(paths)} file(s); {n_images} readable image(s)"
          + ("" if not args.quick else " (headers only, --quick)"))
    print(f"{'split':<8}{'normal':>8}{'abnormal':>10}{'unknown':>9}{'total':>8}")
    for split, c in info["counts"].items():
        print(f"{split:<8}{c['normal']:>8}{c['abnormal']:>10}{c['unknown']:>9}{c['total']:>8}")

    def summary(counter: Counter, top: int = 5) -> str:
        items = [f"{k} ({v})" for k, v in counter.most_common(top)]
        if len(counter) > top:
            items.append(f"... {len(counter) - top} more")
        return ", ".join(items) or "-"

    print(f"formats: {summary(formats)}")
    print(f"modes:   {summary(modes)}")
    print(f"sizes:   {summary(sizes)}")
    if info["n_patients"]:
        print(f"patients: {info['n_patients']}")
    if info["n_masks"]:
        print(f"masks:   {info['n_masks']}")
    if unreadable:
        print(f"unreadable ({len(unreadable)}):")
        for u in unreadable:
            print(f"  {u['path']}: {u['reason']}")
    return 0


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------
def _label_records(args) -> list[ImageRecord] | None:
    if args.labels:
        return discover(_abspath(args.labels))
    if args.data:
        return discover(_abspath(args.data))
    return None


def _labeled_arrays(rows: list[dict], what: str) -> tuple[np.ndarray, np.ndarray, list, int]:
    kept = [r for r in rows if r["label"] in (NORMAL, ABNORMAL)]
    if not kept:
        raise ScanomalyError(f"{what}: no labeled rows (give --labels CSV or --data DIR, or a label column)")
    return (np.array([r["label"] for r in kept], dtype=np.int64), np.array([r["score"] for r in kept]),
            [r["patient_id"] for r in kept], len(rows) - len(kept))


def _cmd_evaluate(args) -> int:
    from .metrics import evaluate, format_metrics_table, patient_scores

    label_records = _label_records(args)
    rows = read_scores_csv(args.scores)
    if label_records is None and all(r["label"] is None for r in rows):
        raise ScanomalyError(f"{args.scores}: no label column; give --labels CSV or --data DIR")
    rows, unmatched = _attach_labels(rows, label_records)
    if unmatched:
        print(f"warning: {unmatched} scored image(s) not found in the labels; left out", file=sys.stderr)
    y, s, pids, n_unlabeled = _labeled_arrays(rows, str(args.scores))
    if n_unlabeled:
        print(f"warning: {n_unlabeled} scored image(s) have no label; left out", file=sys.stderr)

    val_y = val_s = val_pids = None
    if args.val_scores:
        vrows = read_scores_csv(args.val_scores)
        if label_records is not None and any(r["label"] is None for r in vrows):
            vrows, _ = _attach_labels(vrows, label_records)
        val_y, val_s, val_pids, _ = _labeled_arrays(vrows, str(args.val_scores))

    common = dict(rule=args.threshold_rule, n_bootstrap=args.n_bootstrap, seed=args.seed,
                  target_sensitivity=args.target_sensitivity)
    result = evaluate(y, s, val_labels=val_y, val_scores=val_s, **common)
    result["scores_csv"] = str(args.scores)
    result["val_scores_csv"] = str(args.val_scores) if args.val_scores else None
    result["n_unmatched"] = unmatched
    result["n_unlabeled"] = n_unlabeled
    table = {"image-level": result}
    if args.per_patient:
        if any(p is None for p in pids):
            raise ScanomalyError("--per-patient needs a patient id for every image (a patient_id column in the "
                                 "labels manifest or the scores CSV)")
        ps, py, _ = patient_scores(s, pids, y, reduce=args.per_patient, k=args.top_k)
        pv = {}
        if val_y is not None and all(p is not None for p in val_pids):
            vps, vpy, _ = patient_scores(val_s, val_pids, val_y, reduce=args.per_patient, k=args.top_k)
            pv = dict(val_labels=vpy, val_scores=vps)
        result["patient"] = evaluate(py, ps, **pv, **common)
        result["patient"]["reduce"] = args.per_patient
        table[f"patient ({args.per_patient})"] = result["patient"]
    print(format_metrics_table(table))
    if result["threshold_source"] != "validation":
        print("note: the threshold was chosen on the evaluated data itself (oracle, optimistic); "
              "pass --val-scores to choose it on validation data")
    if args.out:
        _write_json(Path(args.out), result)
        print(f"metrics written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
def _overrides(cls, args) -> tuple[dict, dict]:
    from .preprocess import Preprocessing

    config_fields = {f.name for f in dataclasses.fields(cls.Config)} if dataclasses.is_dataclass(cls.Config) else set()
    prep_fields = {f.name for f in dataclasses.fields(Preprocessing)}
    config, prep = {}, {}
    for flag, key, value in (("--iters", "iterations", args.iters), ("--batch-size", "batch_size", args.batch_size),
                             ("--seed", "seed", args.seed)):
        if value is None:
            continue
        if key not in config_fields:
            raise ScanomalyError(f"method {cls.name!r} has no {key!r} option, so {flag} does not apply")
        config[key] = value
    if args.image_size is not None:
        prep["image_size"] = args.image_size
    for item in args.set or []:
        if "=" not in item:
            raise ScanomalyError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text)
        if key.startswith("preprocessing."):
            key = key.split(".", 1)[1]
            if key not in prep_fields:
                raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
            prep[key] = value
        elif key in config_fields:
            config[key] = value
        elif key in prep_fields:
            prep[key] = value
        else:
            raise ScanomalyError(f"unknown option {key!r} for method {cls.name!r}; config options: "
                                 f"{sorted(config_fields)}; preprocessing options: {sorted(prep_fields)}")
    return config, prep


def _without_labels(records: list[ImageRecord]) -> list[ImageRecord]:
    return [replace(r, label=UNKNOWN) for r in records]


def _cmd_train(args) -> int:
    from . import distributed
    from .detector import get_method

    t0 = time.time()
    cls = get_method(args.method)
    if distributed.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not cls.distributed_training:
        raise ScanomalyError(f"method {cls.name!r} does not train with torchrun (it has no gradient steps to "
                             "share out); run it as one process")
    world = distributed.init_from_env(args.device)  # a no-op unless launched by torchrun
    try:
        return _train(args, cls, world, t0)
    finally:
        distributed.shutdown()


def _train(args, cls, world, t0) -> int:
    from .detector import config_to_dict
    from .splits import make_healthygan_split, split_counts, write_split_manifest

    config_overrides, prep_overrides = _overrides(cls, args)
    det = cls.from_profile(args.profile, config_overrides, prep_overrides, device=args.device, precision=args.precision)
    run = _abspath(args.out)
    run.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress and world.is_main

    split = None
    holdout_recs: list[ImageRecord] = []
    val_recs: list[ImageRecord] = []
    if args.from_labeled:
        records = discover(_abspath(args.from_labeled))
        split = make_healthygan_split(
            records,
            abnormal_fraction=args.abnormal_fraction,
            healthy_fraction=args.healthy_fraction,
            holdout_fraction=args.holdout_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed if args.seed is not None else 0,
        )
        write_split_manifest(split, run / "split.csv")
        healthy_recs, unlabeled_recs = split.healthy, split.unlabeled
        holdout_recs, val_recs = split.healthy_holdout, split.val
    else:
        healthy_recs = discover(_abspath(args.healthy))
        n_abn = sum(r.label == ABNORMAL for r in healthy_recs)
        if n_abn:
            raise ScanomalyError(f"{args.healthy}: {n_abn} image(s) are labeled abnormal; --healthy takes known-healthy "
                                 "images only (use --from-labeled DIR for a labeled data set)")
        unlabeled_recs = discover(_abspath(args.unlabeled)) if args.unlabeled else None

    if det.needs_unlabeled and not unlabeled_recs:
        raise ScanomalyError(f"method {cls.name!r} also trains on unlabeled (mixed) images: give --unlabeled DIR, "
                             "or --from-labeled DIR to build the split")
    if not det.needs_unlabeled and args.unlabeled:
        print(f"warning: method {cls.name!r} trains on healthy images only; --unlabeled is ignored", file=sys.stderr)

    healthy_set = load_images(healthy_recs, det.preprocessing, progress=progress, desc="healthy")
    skipped = list(healthy_set.skipped)
    unlabeled_set = None
    if det.needs_unlabeled:
        # the mixed set's labels must not reach training: they are kept in split.csv for analysis only
        unlabeled_set = load_images(_without_labels(unlabeled_recs), det.preprocessing, progress=progress,
                                    desc="unlabeled")
        skipped += unlabeled_set.skipped
    fit_kwargs = {"work_dir": run, "progress": progress}
    if holdout_recs and "holdout" in inspect.signature(det.fit).parameters:
        holdout_set = load_images(holdout_recs, det.preprocessing, progress=progress, desc="holdout")
        skipped += holdout_set.skipped
        fit_kwargs["holdout"] = holdout_set

    if world.is_main:
        print(f"training {cls.name} ({args.profile} profile) on {len(healthy_set)} healthy"
              + (f" + {len(unlabeled_set)} unlabeled" if unlabeled_set is not None else "")
              + f" image(s), device {det.device}"
              + (f", {world.size} processes" if world.distributed else ""), file=sys.stderr)
    det.fit(healthy_set, unlabeled_set, **fit_kwargs)
    if not world.is_main:  # the ranks end with identical models: rank 0 saves and scores
        return 0
    model_dir = det.save(run / "model")

    n_val = 0
    if val_recs:
        val_set = load_images(val_recs, det.preprocessing, progress=progress, desc="validation")
        skipped += val_set.skipped
        bs = {"batch_size": args.batch_size} if args.batch_size else {}
        val_scores, _ = det.score(val_set, **bs)
        roles = {(r.path, r.index): ("healthy_holdout" if r.label == NORMAL else "val_abnormal") for r in val_recs}
        write_scores_csv(run / "val_scores.csv", val_set.records, val_scores,
                         extra={"role": [roles.get((r.path, r.index), "") for r in val_set.records]})
        n_val = len(val_set)

    seconds = time.time() - t0
    summary = {
        "method": cls.name,
        "profile": args.profile,
        "device": str(det.device),
        "precision": det.precision,
        "config": config_to_dict(det.config),
        "preprocessing": det.preprocessing.to_dict(),
        "data": {"healthy": args.healthy, "unlabeled": args.unlabeled, "from_labeled": args.from_labeled},
        "counts": {
            "healthy": len(healthy_set),
            "unlabeled": len(unlabeled_set) if unlabeled_set is not None else 0,
            "holdout": len(holdout_recs),
            "val": n_val,
            "skipped": len(skipped),
        },
        "split": split_counts(split) if split is not None else None,
        "seconds": round(seconds, 2),
        "model": str(model_dir),
        "skipped": skipped,
        "version": __version__,
    }
    _write_json(run / "train_summary.json", summary)
    _print_skipped(skipped)
    print(f"model saved to {model_dir} ({seconds:.1f} s)")
    if split is not None:
        print(f"split written to {run / 'split.csv'}; validation scores to {run / 'val_scores.csv'}")
    return 0


# ------------------------------------------------------------------------------------------
# score
# ------------------------------------------------------------------------------------------
def _model_dir(path: Path) -> Path:
    from .detector import MODEL_CONFIG

    if (path / "model" / MODEL_CONFIG).is_file():
        return path / "model"
    return path


def _load_scorer(args):
    """The saved Detector (--runtime torch), or ONNX Runtime on the exported model.onnx (--runtime onnx)."""
    run = _abspath(args.model)
    if not run.exists():
        raise ScanomalyError(f"{args.model}: no such run or model folder")
    if args.runtime == "onnx":
        from .export import OnnxScorer, find_onnx

        return OnnxScorer(find_onnx(run))
    from .detector import Detector

    det = Detector.load(_model_dir(run), device=args.device, precision=args.precision)
    if args.compile:
        if not hasattr(det, "compile"):
            raise ScanomalyError(f"{det.name} cannot be compiled: its score is not one forward pass of a network")
        det.compile()
    return det


def _records_to_score(args) -> list[ImageRecord]:
    source = _abspath(args.images)
    if not args.role:
        return discover(source)
    from .splits import ROLES, read_split_manifest

    split = read_split_manifest(source)
    if args.role not in ROLES + ("val",):
        raise ScanomalyError(f"unknown role {args.role!r}; use one of {ROLES + ('val',)}")
    records = getattr(split, args.role)
    if not records:
        raise ScanomalyError(f"{args.images}: no records with role {args.role!r}")
    return records


def _cmd_score(args) -> int:
    from . import distributed

    world = distributed.init_from_env(args.device)  # under torchrun: one shard per rank (distributed_scoring.py)
    try:
        return _score(args, world)
    finally:
        distributed.shutdown()


def _score(args, world) -> int:
    from .streaming import score_stream

    scorer = _load_scorer(args)
    records = _records_to_score(args)
    out = _abspath(args.out)
    # volumes in, volumes out: NIfTI / DICOM maps on the input's grid (volumes.py)
    from .volumes import VolumeOutputs, volume_scores_path

    volumes = VolumeOutputs(scorer, records, _abspath(args.heatmaps)) if args.heatmaps else None
    options = dict(batch_size=args.batch_size, workers=args.workers,
                   heatmap_dir=_abspath(args.heatmaps) if args.heatmaps else None,
                   heatmap_range=tuple(args.heatmap_range) if args.heatmap_range else None,
                   overwrite=args.overwrite, progress=not args.no_progress)
    volume_csv = None
    try:
        if world.distributed:
            from .distributed_scoring import score_sharded

            summary = score_sharded(scorer, records, out, volumes=volumes or None, **options)
            volume_csv = volume_scores_path(out) if volumes and world.is_main else None  # rank 0 wrote it
        else:
            summary = score_stream(scorer, records, out, on_scored=volumes.add if volumes else None, **options)
            volume_csv = volumes.finish(out, batch_size=args.batch_size) if volumes else None
    except KeyboardInterrupt:
        print(f"the images scored so far are in {out}; run the same command again to resume", file=sys.stderr)
        raise
    if not world.is_main:
        return 0
    skipped_path = out.with_name(out.stem + "_skipped.json")
    _write_json(skipped_path, summary.skipped)
    _print_skipped(summary.skipped)
    print(f"scored {summary.n_scored} image(s) with {scorer.name} ({args.runtime}, "
          f"{summary.images_per_second:.1f} images/s"
          + (f" on {world.size} processes" if world.distributed else "") + f"): scores in {out}"
          + (f" ({summary.n_already_scored} scored before, not again)" if summary.n_already_scored else "")
          + (f", heatmaps in {args.heatmaps}" if args.heatmaps else "")
          + (f"; {len(volumes.volumes)} volume map(s), volume scores in {volume_csv}" if volume_csv else "")
          + (f"; {len(summary.skipped)} skipped (listed in {skipped_path})" if summary.skipped else ""))
    return 0


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------
def _cmd_export(args) -> int:
    from .detector import Detector
    from .export import ONNX_FILE, export_onnx

    run = _abspath(args.model)
    if not run.exists():
        raise ScanomalyError(f"{args.model}: no such run or model folder")
    model_dir = _model_dir(run)
    det = Detector.load(model_dir, device="cpu")
    result = export_onnx(det, _abspath(args.out) if args.out else model_dir / ONNX_FILE, opset=args.opset)
    print(f"exported {det.name} to {result.path} (ONNX opset {result.opset}, dynamic batch axis, preprocessing "
          f"in its metadata); ONNX Runtime against PyTorch on a probe batch: largest score difference "
          f"{result.max_score_difference:.2g}")
    return 0


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    try:
        from .demo import run_demo
    except ImportError as exc:
        raise ScanomalyError(f"the demo is not available in this installation ({exc})") from None
    result = run_demo(args)
    return int(result) if isinstance(result, int) else 0


# ------------------------------------------------------------------------------------------
# benchmark and report
# ------------------------------------------------------------------------------------------
def _set_options(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ScanomalyError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        out[key.strip()] = _parse_value(text)
    return out


def _cmd_benchmark(args) -> int:
    from .suite import ALL_METHODS, results_markdown, run_benchmark

    out = _abspath(args.out)
    results = run_benchmark(
        _abspath(args.data),
        args.methods or ",".join(ALL_METHODS),
        out,
        profile=args.profile,
        seeds=args.seeds,
        split_seed=args.split_seed,
        abnormal_fraction=args.abnormal_fraction,
        one_class_train=args.one_class_train,
        config_overrides=_set_options(args.set),
        device=args.device,
        precision=args.precision,
        n_bootstrap=args.n_bootstrap,
        report=not args.no_report,
        progress=not args.no_progress,
    )
    print(results_markdown(results))
    report = out / "report.html"
    print(f"results in {out / 'results.json'}, results.csv, results.md"
          + (f"; report in {report}" if not args.no_report and report.is_file() else ""))
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        print(f"warning: {len(failed)} of {len(results['runs'])} run(s) failed; their errors are listed above "
              f"and in {out}/<method>/seed<k>/error.txt", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    path = build_report(_abspath(args.dir), out=_abspath(args.out) if args.out else None, n_gallery=args.gallery,
                        device=args.device)
    print(f"report written to {path}")
    return 0


# ------------------------------------------------------------------------------------------
# parser and entry point
# ------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------
# view (the local web viewer, viewer/)
# ------------------------------------------------------------------------------------------
def _cmd_view(args) -> int:
    from .viewer import serve

    if args.max_upload_mb <= 0:
        raise ScanomalyError("--max-upload-mb must be positive")
    serve(args.target, model=args.model, host=args.host, port=args.port, workdir=args.workdir,
          max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .metrics import REDUCTIONS, THRESHOLD_RULES

    parser = argparse.ArgumentParser(
        prog="scanomaly",
        description="Unsupervised anomaly detection in medical images: HealthyGAN and its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"scanomaly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="summarise a data folder or manifest: classes, splits, sizes, unreadable files")
    p.add_argument("source", metavar="DIR_OR_CSV")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quick", action="store_true", help="read file headers only (no full decode)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("evaluate", help="AUROC (with bootstrap CI), AUPRC and threshold metrics of a scores CSV")
    p.add_argument("scores", metavar="SCORES_CSV", help="CSV with path,score[,label] (as written by `score`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", metavar="CSV", help="manifest with path,label[,patient_id]")
    g.add_argument("--data", metavar="DIR", help="labeled data folder ({normal,abnormal} layouts)")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="balanced")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="for --threshold-rule sensitivity")
    p.add_argument("--val-scores", metavar="CSV", help="validation scores to choose the threshold on "
                                                        "(e.g. RUN/val_scores.csv)")
    p.add_argument("--per-patient", choices=REDUCTIONS, help="also report patient-level metrics")
    p.add_argument("--top-k", type=int, default=3, help="k for --per-patient topk_mean")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="JSON", help="write the metrics here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train a method and save it")
    p.add_argument("method", metavar="METHOD")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--healthy", metavar="DIR", help="known-healthy training images")
    g.add_argument("--from-labeled", metavar="DIR", help="a labeled data set, split by the HealthyGAN protocol")
    p.add_argument("--unlabeled", metavar="DIR", help="mixed, unlabeled images (with --healthy)")
    p.add_argument("--abnormal-fraction", type=float, default=0.3, help="abnormal share of the unlabeled set")
    p.add_argument("--healthy-fraction", type=float, default=0.5, help="share of training normals in the healthy set")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of the healthy set held out")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share when the data has no test split")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (model/, split.csv, summaries)")
    p.add_argument("--profile", default="cpu", help="named settings: cpu, paper or tiny")
    p.add_argument("--iters", type=int, help="training iterations (config 'iterations')")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "16-mixed"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config (or preprocessing) option")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    from .export import DEFAULT_OPSET
    from .streaming import DEFAULT_WORKERS

    p = sub.add_parser("score", help="score images with a trained model, streaming (resumable); optional heatmap panels")
    p.add_argument("model", metavar="RUN_OR_MODEL_DIR")
    p.add_argument("images", metavar="IMAGES_OR_DIR", help="folder, image file, manifest CSV or .npz")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--heatmaps", metavar="DIR", help="write one heatmap panel PNG per image here")
    p.add_argument("--role", help="with a split.csv: score only this role (e.g. test, val)")
    p.add_argument("--batch-size", type=int, default=64, help="images read, scored and written at a time (default 64)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"processes that read and preprocess images (default {DEFAULT_WORKERS}; 0: in the main process)")
    p.add_argument("--heatmap-range", type=float, nargs=2, metavar=("VMIN", "VMAX"),
                   help="colour scale of the heatmap panels (default: from the first batch, kept for the run)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over; by default an existing --out is resumed (images already in it are not rescored)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="onnx: ONNX Runtime on the model folder's model.onnx (see `export`), or give a .onnx file as RUN")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (--runtime torch)")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "16-mixed"),
                   help="autocast while scoring (--runtime torch): bf16 on recent GPUs and AMX CPUs, 16-mixed on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the scoring network (--runtime torch; one-pass methods); pays off on long runs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("view", help="look at scored scans in a local web viewer (sorted, filtered, heatmaps, threshold)")
    p.add_argument("target", metavar="SCORES_CSV_OR_RUN_OR_BENCHMARK")
    p.add_argument("--model", metavar="RUN_OR_MODEL_DIR", help="the model that scored them (default: beside the CSV)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--workdir", help="the only folder the viewer writes to (uploads); default a temporary one")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest file accepted for scoring (default 32)")
    p.set_defaults(func=_cmd_view)

    p = sub.add_parser("export", help="export a trained model for deployment (ONNX, with its preprocessing)")
    p.add_argument("model", metavar="RUN_OR_MODEL_DIR")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: MODEL_DIR/model.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="train and evaluate on the bundled chest X-ray sample")
    p.add_argument("--out", default="scanomaly_demo", metavar="DIR")
    p.add_argument("--iters", type=int, help="training iterations (default 300)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("benchmark", help="train and score several methods and seeds on one shared split; "
                                         "results tables and an HTML report (exit 1 if a run failed)")
    p.add_argument("--data", required=True, metavar="DIR", help="a labeled data set (folder layout, manifest or .npz)")
    p.add_argument("--methods", metavar="A,B,...",
                   help="comma-separated methods (default: healthygan,anogan,fanogan,ganomaly,alad,alocc,padim,patchcore)")
    p.add_argument("--out", required=True, metavar="DIR", help="benchmark folder; an existing one is resumed")
    p.add_argument("--profile", default="cpu", help="named settings: cpu, paper or tiny")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="train every method with seeds 0..N-1")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the (one, shared) data split")
    p.add_argument("--abnormal-fraction", type=float, default=0.3, help="abnormal share of the unlabeled set A")
    p.add_argument("--one-class-train", choices=("healthy", "all_normals"), default="healthy",
                   help="one-class methods train on B (healthy) or on every training normal (all_normals, a ceiling)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "16-mixed"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config option for every method that has it, METHOD.KEY=VALUE for one method, "
                        "or preprocessing.KEY=VALUE")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC interval")
    p.add_argument("--no-report", action="store_true", help="skip report.html (build it later with `report`)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("report", help="(re)build the self-contained report.html of a benchmark or run folder")
    p.add_argument("dir", metavar="BENCHMARK_OR_RUN_DIR")
    p.add_argument("--out", metavar="HTML", help="where to write it (default: DIR/report.html)")
    p.add_argument("--gallery", type=int, default=4, metavar="N",
                   help="show the N most and N least anomalous test images (0: no gallery)")
    p.add_argument("--device", default="cpu", help="device for the gallery's models (cpu, cuda or auto)")
    p.set_defaults(func=_cmd_report)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except ScanomalyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
