"""Benchmark one method on one labeled data set, by the HealthyGAN protocol.

1. Split once (seeded): known-healthy B, held-out healthy, mixed unlabeled A, validation
   abnormals, and the test split (official where the layout has one).
2. Train: HealthyGAN on A + B; one-class methods on B (or on all training normals, as a ceiling).
3. Choose thresholds on validation data (held-out healthy + validation abnormals), never on test.
4. Score the test split once and report AUROC (bootstrap CI), AUPRC and threshold metrics,
   training time, scoring throughput and peak memory.

Checkpoint analysis (HealthyGAN with snapshots): after the run, every kept checkpoint is also
scored on test, to measure how well label-free AUCp picks. This is analysis only; it does not
change which checkpoint is reported.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .data import discover, load_images
from .detector import Detector, get_method
from .metrics import evaluate
from .splits import make_healthygan_split, read_split_manifest, split_counts, write_split_manifest


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_score(det: Detector, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    scores, maps = det.score(images, batch_size=batch_size)
    dt = time.perf_counter() - t0
    return scores, maps, len(scores) / dt if dt > 0 else float("nan")


def run_method(
    method: str,
    data,
    out_dir,
    profile: str = "cpu",
    seed: int = 0,
    split_seed: int = 0,
    abnormal_fraction: float = 0.3,
    config_overrides: dict | None = None,
    preprocessing_overrides: dict | None = None,
    device: str = "cpu",
    precision: str = "32",
    one_class_train: str = "healthy",  # "healthy" (= B) or "all_normals" (B + holdout + A's normals: a ceiling)
    progress: bool = True,
    n_bootstrap: int = 1000,  # resamples for the test AUROC's bootstrap CI
    pixel_region: str = "foreground",  # headline pixel metrics: "foreground" (head, from intensity) or "all"
) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cls = get_method(method)
    overrides = {"seed": seed, **(config_overrides or {})}
    det = cls.from_profile(profile, overrides, preprocessing_overrides, device=device, precision=precision)

    split_csv = out_dir / "split.csv"
    if split_csv.is_file():  # a resumed run reuses its split exactly
        split = read_split_manifest(split_csv)
    else:
        split = make_healthygan_split(discover(data), abnormal_fraction=abnormal_fraction, seed=split_seed)
        write_split_manifest(split, split_csv)

    prep = det.preprocessing
    healthy = load_images(split.healthy, prep, progress, "B (healthy)")
    holdout = load_images(split.healthy_holdout, prep, progress, "healthy hold-out")
    unlabeled = load_images(split.unlabeled, prep, progress, "A (unlabeled)")
    val = load_images(split.val, prep, progress, "validation")
    test = load_images(split.test, prep, progress, "test")

    t0 = time.perf_counter()
    if cls.needs_unlabeled:
        det.fit(healthy, unlabeled, holdout=holdout, work_dir=out_dir / "train", progress=progress)
    else:
        train = healthy
        if one_class_train == "all_normals":
            normals = unlabeled.subset(np.flatnonzero(unlabeled.labels == 0))
            train = _concat(healthy, holdout, normals)
        det.fit(train, work_dir=out_dir / "train", progress=progress)
    # a resumed run: add what the interrupted attempt(s) spent up to their last checkpoint
    train_seconds = time.perf_counter() - t0 + det.training_seconds_before_resume()
    det.save(out_dir / "model")

    val_scores, val_maps, _ = timed_score(det, val)
    test_scores, test_maps, images_per_second = timed_score(det, test)
    result = {
        "method": method,
        "profile": profile,
        "seed": seed,
        "split_seed": split_seed,
        "data": str(data),
        "precision": precision,
        "device": str(det.device),
        "image_size": prep.image_size,
        "preprocessing": prep.to_dict(),
        "split": split_counts(split),
        "train_seconds": train_seconds,
        "scoring_images_per_second": images_per_second,
        "peak_rss_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "test": _evaluate_rules(test.labels, test_scores, val.labels, val_scores, seed, n_bootstrap),
        "extra": det.extra_state(),
    }
    train_result = getattr(det, "train_result", None)
    if train_result is not None:
        result["iterations_per_second"] = train_result.iterations_per_second
    result.update(_localization_and_anatomy(data, out_dir, test, test_scores, test_maps, val, val_scores, val_maps,
                                            pixel_region))
    snapshots = sorted((out_dir / "train" / "snapshots").glob("step_*.safetensors"))
    if snapshots:
        result["checkpoint_analysis"] = _checkpoint_analysis(det, snapshots, test, result["extra"])
    _write_scores(out_dir / "test_scores.csv", test, test_scores)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _localization_and_anatomy(data, out_dir: Path, test, test_scores, test_maps, val, val_scores, val_maps,
                              pixel_region: str) -> dict:
    """The result.json blocks beyond image AUROC, where the data allows them:
    - "localization" (test masks with lesions): pixel AUROC, AUPRO and Dice against the masks, the
      Dice threshold chosen on the validation maps; the gallery slices' maps in localization_gallery.npz;
    - "slice_matched" (a manifest with slice positions): image AUROC among mid-volume test slices and
      a position-only baseline;
    - "patient_level" and "per_patient" (patient ids): patient AUROCs from slice scores, and per
      patient the slice AUROC, pixel AUROC and Dice (localization_per_patient.csv).
    See localization.py."""
    from . import localization as loc

    out: dict = {}
    test_masks = _masks_at(test, test_maps)
    val_masks = _masks_at(val, val_maps)
    region = threshold = None
    if test_masks is not None and test_masks.any():
        test_maps = _maps_at(test_maps, test_masks.shape[1:])
        val_maps_ok = val_masks is not None and len(val_maps) == len(val)
        foreground = pixel_region == "foreground"
        region = loc.foreground_mask(test.images.numpy()) if foreground else None
        block = loc.evaluate_localization(
            test_maps, test_masks, test.images.numpy(),
            _maps_at(val_maps, val_masks.shape[1:]) if val_maps_ok else None,
            val_masks if val_maps_ok else None, val.images.numpy() if val_maps_ok else None,
            region=pixel_region, test_region=region,
            val_region=loc.foreground_mask(val.images.numpy()) if foreground and val_maps_ok else None)
        out["localization"] = block
        threshold = block.get("dice_threshold")
        positions = loc.positions_of(test.records, loc.read_slice_positions(data))
        idx = loc.gallery_indices(test.records, test_masks, positions=positions)
        if idx:
            loc.save_gallery(out_dir / loc.GALLERY_FILE, idx, test.records, test.images.numpy(), test_masks, test_maps,
                             region=region, threshold=threshold, val_maps=val_maps if len(val_maps) else None)
            block["gallery"] = loc.GALLERY_FILE
    positions = loc.read_slice_positions(data)
    if positions:
        tp = loc.positions_of(test.records, positions)
        if np.isfinite(tp).any():
            out["slice_matched"] = loc.slice_matched(test_scores, test.labels, tp, val.labels,
                                                     loc.positions_of(val.records, positions))
    ids = test.patient_ids
    if ids and all(ids):
        out["patient_level"] = loc.patient_level(test_scores, test.labels, ids)
        with_maps = "localization" in out
        rows = loc.per_patient(test_scores, test.labels, ids, test_maps if with_maps else None,
                               test_masks if with_maps else None, region, threshold)
        loc.write_per_patient(rows, out_dir / loc.PER_PATIENT_FILE)
        out["per_patient"] = {**loc.summarize_per_patient(rows), "file": loc.PER_PATIENT_FILE}
    return out


def _masks_at(images, maps) -> np.ndarray | None:
    """The set's masks as a bool array, or None when it has none."""
    if images.masks is None or maps is None or len(maps) != len(images):
        return None
    return images.masks.numpy().astype(bool)


def _maps_at(maps, size) -> np.ndarray:
    """Maps at the masks' size (every method here returns maps at its input size; resized
    bilinearly, as a safeguard, where one does not)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1:] == tuple(size):
        return maps
    t = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=tuple(size), mode="bilinear",
                                        align_corners=False)
    return t[:, 0].numpy()


def _evaluate_rules(labels, scores, val_labels, val_scores, seed: int, n_bootstrap: int) -> dict:
    """Test metrics at the balanced and the max-F1 thresholds, both chosen on validation data.
    The AUROC bootstrap does not depend on the threshold, so it runs once."""
    out = {"balanced": evaluate(labels, scores, rule="balanced", val_labels=val_labels, val_scores=val_scores,
                                seed=seed, n_bootstrap=n_bootstrap)}
    out["max_f1"] = evaluate(labels, scores, rule="max_f1", val_labels=val_labels, val_scores=val_scores, n_bootstrap=0)
    out["max_f1"]["auroc_ci_low"] = out["balanced"]["auroc_ci_low"]
    out["max_f1"]["auroc_ci_high"] = out["balanced"]["auroc_ci_high"]
    return out


def _checkpoint_analysis(det: Detector, snapshots, test, extra: dict) -> list[dict]:
    """Test AUROC of every kept checkpoint beside its AUCp: how well does label-free selection pick?"""
    from sklearn.metrics import roc_auc_score

    aucp = {h["step"]: h["metric"] for h in extra.get("aucp_history", [])}
    selected = det.state_tensors()
    rows = []
    for snap in snapshots:
        step = int(snap.stem.split("_")[1])
        det.load_state_tensors(load_file(str(snap)))
        scores, _ = det.score(test)
        rows.append({"step": step, "aucp": aucp.get(step), "test_auroc": float(roc_auc_score(test.labels, scores))})
    det.load_state_tensors(selected)
    return rows


def _concat(*sets):
    from .data import ImageSet

    return ImageSet(images=torch.cat([s.images for s in sets]), records=[r for s in sets for r in s.records])


def _write_scores(path: Path, images, scores) -> None:
    """test_scores.csv, in the columns of `scanomaly score` (scores_csv.SCORE_COLUMNS)."""
    from .scores_csv import write_scores_csv

    write_scores_csv(path, images.records, scores)


def markdown_row(r: dict, rule: str = "balanced") -> str:
    t = r["test"][rule]
    return (
        f"| {r['method']} | {r['profile']} | {r['seed']} | {t['auroc']:.3f} [{t['auroc_ci_low']:.3f}, {t['auroc_ci_high']:.3f}] "
        f"| {t['auprc']:.3f} | {t['precision']:.3f} | {t['recall']:.3f} | {t['specificity']:.3f} | {t['f1']:.3f} "
        f"| {r['train_seconds'] / 60:.1f} | {r['scoring_images_per_second']:.0f} | {r['peak_rss_mib']:.0f} |"
    )
