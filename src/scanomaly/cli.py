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
import dataclasses
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import __version__
from .data import ABNORMAL, NORMAL, ImageRecord, discover, label_text
from .errors import ImageReadError, ScanomalyError
from .scores_csv import SCORE_COLUMNS, read_scores_csv, record_key, write_scores_csv  # noqa: F401 - re-exported

# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def _abspath(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


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
    from .runs import require_labels

    source = args.labels or args.data
    if not source:
        return None
    records = discover(_abspath(source))
    require_labels(records, source, "evaluate")  # a manifest without a label column is no label source
    return records


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
    from .runs import evaluation_warnings

    for message in evaluation_warnings(args.scores, rows, result.get("auroc")):
        print(f"warning: {message}", file=sys.stderr)
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
    """(config, preprocessing) options of `train`: its flags, then --set."""
    from .options import parse_set, split_options

    config, prep = {}, {}
    for flag, key, value in (("--iters", "iterations", args.iters), ("--batch-size", "batch_size", args.batch_size),
                             ("--seed", "seed", args.seed)):
        if value is None:
            continue
        if key not in {f.name for f in dataclasses.fields(cls.Config)}:
            raise ScanomalyError(f"method {cls.name!r} has no {key!r} option, so {flag} does not apply")
        config[key] = value
    if args.image_size is not None:
        prep["image_size"] = args.image_size
    set_config, set_prep = split_options(cls, parse_set(args.set))  # --set wins over the flags
    return {**config, **set_config}, {**prep, **set_prep}


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
    from . import checks, distributed, runs
    from .detector import config_to_dict
    from .splits import HealthyGANSplit, make_healthygan_split

    # every option is checked, the data found and the split made before anything is written
    config_overrides, prep_overrides = _overrides(cls, args)
    det = checks.build_detector(cls, args.profile, config_overrides, prep_overrides, device=args.device,
                                precision=args.precision)
    run = _abspath(args.out)
    progress = not args.no_progress and world.is_main

    labeled_split = split_options = None
    if args.from_labeled:
        records = discover(_abspath(args.from_labeled))
        runs.require_labels(records, args.from_labeled, "train --from-labeled")
        split_options = dict(
            abnormal_fraction=args.abnormal_fraction,
            healthy_fraction=args.healthy_fraction,
            holdout_fraction=args.holdout_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed if args.seed is not None else 0,
        )
        split = labeled_split = make_healthygan_split(records, **split_options)
    else:
        records = healthy_recs = discover(_abspath(args.healthy))
        n_abn = sum(r.label == ABNORMAL for r in healthy_recs)
        if n_abn:
            raise ScanomalyError(f"{args.healthy}: {n_abn} image(s) are labeled abnormal; --healthy takes known-healthy "
                                 "images only (use --from-labeled DIR for a labeled data set)")
        unlabeled_recs = discover(_abspath(args.unlabeled)) if args.unlabeled else []
        records = records + unlabeled_recs
        split = HealthyGANSplit(healthy=healthy_recs, unlabeled=unlabeled_recs)
    if det.needs_unlabeled and not split.unlabeled:
        raise ScanomalyError(f"method {cls.name!r} also trains on unlabeled (mixed) images: give --unlabeled DIR, "
                             "or --from-labeled DIR to build the split")
    if not det.needs_unlabeled and args.unlabeled:
        print(f"warning: method {cls.name!r} trains on healthy images only; --unlabeled is ignored", file=sys.stderr)

    # the folder holds this run only: an earlier run with other data, split, options or code is refused
    fingerprint = runs.train_fingerprint(
        data={**{k: str(_abspath(v)) if v else None for k, v in (("healthy", args.healthy), ("unlabeled", args.unlabeled),
                                                                 ("from_labeled", args.from_labeled))},
              "records": runs.records_digest(records)},
        split=None if labeled_split is None else {"options": split_options, "roles": runs.split_digest(labeled_split)},
        options={"method": cls.name, "profile": args.profile, "config": config_to_dict(det.config),
                 "preprocessing": det.preprocessing.to_dict(), "precision": det.precision})
    created = runs.prepare_run(run, fingerprint, overwrite=args.overwrite, write=world.is_main)
    distributed.barrier()  # no rank reads the folder before rank 0 has made it ready
    try:
        return _train_in(args, cls, world, t0, det, run, progress, split, labeled_split)
    except BaseException:
        if world.is_main:
            runs.discard_unused(run, created)  # a failure leaves no empty or half-made --out
        raise


def _train_in(args, cls, world, t0, det, run, progress, split, labeled_split) -> int:
    from .detector import config_to_dict
    from .pipeline import VAL_SCORES, train_on_split
    from .splits import split_counts, write_split_manifest

    if labeled_split is not None and world.is_main:
        write_split_manifest(labeled_split, run / "split.csv")

    def log(message: str) -> None:
        if world.is_main:
            print(message + (f", {world.size} processes" if world.distributed else ""), file=sys.stderr)

    trained = train_on_split(det, split, run, progress=progress, is_main=world.is_main, log=log,
                             score_batch_size=args.batch_size or 64)
    if trained is None:  # not rank 0 of a distributed run
        return 0

    seconds = time.time() - t0
    summary = {
        "method": cls.name,
        "profile": args.profile,
        "device": str(det.device),
        "precision": det.precision,
        "config": config_to_dict(det.config),
        "preprocessing": det.preprocessing.to_dict(),
        "data": {"healthy": args.healthy, "unlabeled": args.unlabeled, "from_labeled": args.from_labeled},
        "counts": {**trained.counts, "val": len(trained.val) if trained.val is not None else 0,
                   "skipped": len(trained.skipped)},
        "split": split_counts(labeled_split) if labeled_split is not None else None,
        "seconds": round(seconds, 2),
        "model": str(trained.model_dir),
        "skipped": trained.skipped,
        "version": __version__,
    }
    _write_json(run / "train_summary.json", summary)
    _print_skipped(trained.skipped)
    print(f"model saved to {trained.model_dir} ({seconds:.1f} s)")
    if labeled_split is not None:
        print(f"split written to {run / 'split.csv'}; validation scores to {run / VAL_SCORES}")
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
        from . import runs
        from .export import OnnxScorer, find_onnx

        scorer = OnnxScorer(find_onnx(run), threads=args.threads)
        runs.check_onnx_matches_model(scorer.path, scorer.metadata)  # never an export of earlier weights
        return scorer
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
        from .runs import warn_if_unlabeled_manifest

        warn_if_unlabeled_manifest(source)
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
    from .threads import default_workers

    scorer = _load_scorer(args)
    records = _records_to_score(args)
    out = _abspath(args.out)
    # volumes in, volumes out: NIfTI / DICOM maps on the input's grid (volumes.py)
    from .volumes import VolumeOutputs, volume_scores_path

    volumes = (VolumeOutputs(scorer, records, _abspath(args.heatmaps), dicom_output=args.dicom_output)
               if args.heatmaps else None)
    options = dict(batch_size=args.batch_size,
                   workers=args.workers if args.workers is not None else default_workers(),
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
def _cmd_benchmark(args) -> int:
    from .benchmark import ALL_METHODS, run_benchmark
    from .options import parse_set
    from .results import results_markdown

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
        config_overrides=parse_set(args.set),
        device=args.device,
        precision=args.precision,
        n_bootstrap=args.n_bootstrap,
        progress=not args.no_progress,
    )
    if not args.no_report:
        _build_report_after_benchmark(out)
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


def _build_report_after_benchmark(out: Path) -> None:
    from .report import build_report

    try:
        path = build_report(out)
        print(f"report written to {path}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the results are written; a report problem must not lose them
        warnings.warn(f"the HTML report could not be built ({type(exc).__name__}: {exc}); "
                      f"rebuild it with `scanomaly report {out}`")


def _cmd_report(args) -> int:
    from .report import build_report

    path = build_report(_abspath(args.dir), out=_abspath(args.out) if args.out else None, n_gallery=args.gallery)
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
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --out that holds another run (by default only the same run is resumed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
    p.set_defaults(func=_cmd_train)

    from .export import DEFAULT_OPSET
    from .volumes import DICOM_OUTPUTS

    p = sub.add_parser("score", help="score images with a trained model, streaming (resumable); optional heatmap panels")
    p.add_argument("model", metavar="RUN_OR_MODEL_DIR")
    p.add_argument("images", metavar="IMAGES_OR_DIR", help="folder, image file, manifest CSV or .npz")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--heatmaps", metavar="DIR", help="write one heatmap panel PNG per image here")
    p.add_argument("--dicom-output", choices=DICOM_OUTPUTS, default="parametric-map",
                   help="with --heatmaps, per DICOM series: a Parametric Map of the anomaly map (default), a "
                        "Secondary Capture series of the scan with the map in colour (for viewers that cannot "
                        "show Parametric Maps), or both")
    p.add_argument("--role", help="with a split.csv: score only this role (e.g. test, val)")
    p.add_argument("--batch-size", type=int, default=64, help="images read, scored and written at a time (default 64)")
    p.add_argument("--workers", type=int,
                   help="processes that read and preprocess images (default: min(2, cores - 1); 0: in the main "
                        "process)")
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
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
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
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="train and evaluate on the bundled chest X-ray sample")
    p.add_argument("--out", default="scanomaly_demo", metavar="DIR")
    p.add_argument("--iters", type=int, help="training iterations (default 300)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
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
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("report", help="(re)build the self-contained report.html of a benchmark or run folder")
    p.add_argument("dir", metavar="BENCHMARK_OR_RUN_DIR")
    p.add_argument("--out", metavar="HTML", help="where to write it (default: DIR/report.html)")
    p.add_argument("--gallery", type=int, default=4, metavar="N",
                   help="show the N most and N least anomalous test images (0: no gallery)")
    p.add_argument("--device", default="cpu", help="accepted for older scripts; the report runs no model")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)")
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
            if hasattr(args, "threads"):  # the heavy verbs: threads chosen before any work (threads.py)
                from .threads import use_threads

                use_threads(args.threads)
            return int(args.func(args) or 0)
        except ScanomalyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
