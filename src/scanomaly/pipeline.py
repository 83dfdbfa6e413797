"""One run, from files to a result: the images of a split loaded, a detector trained, saved and scored.

    trained = train_on_split(det, split, run_dir)      # `scanomaly train`: load -> fit -> save -> score validation
    result = run_method("padim", data, out_dir)        # one benchmark run: train_on_split, then the test split

1. Load the split's images with the detector's preprocessing: B (known healthy); A (mixed, unlabeled) for
   methods that train on it, its labels stripped here (the one place they are: they stay in split.csv for
   analysis and never reach training); the healthy hold-out for methods that take one (`takes_holdout`).
   One-class methods train on B, or with `one_class_train="all_normals"` on every training normal (a ceiling).
2. Fit (checkpoints in `work_dir`, so an interrupted run resumes), save to RUN/model.
3. Score the validation split (RUN/val_scores.csv): thresholds are chosen on it, never on test.
4. `run_method` only: score the test split once; AUROC with a bootstrap CI, AUPRC and threshold metrics at
   thresholds chosen on validation; localisation and anatomy checks where the data has masks, slice positions
   or patient ids (localization.py); RUN/result.json, RUN/test_scores.csv, and RUN/gallery.npz: what the
   report's gallery shows, saved while the model is at hand.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import NORMAL, UNKNOWN, ImageRecord, ImageSet, discover, load_images
from .detector import Detector, get_method
from .errors import ScanomalyError
from .metrics import evaluate
from .scores_csv import write_scores_csv
from .splits import HealthyGANSplit, make_healthygan_split, read_split_manifest, split_counts, write_split_manifest

ONE_CLASS_TRAIN = ("healthy", "all_normals")
VAL_SCORES = "val_scores.csv"
TEST_SCORES = "test_scores.csv"
SCORE_GALLERY = "gallery.npz"


@dataclass
class TrainedRun:
    """What `train_on_split` hands back (on rank 0 of a distributed run)."""

    detector: Detector
    model_dir: Path
    counts: dict[str, int]  # images per role that training used
    train_seconds: float  # the fit, plus what an interrupted earlier attempt spent up to its last checkpoint
    val: ImageSet | None = None
    val_scores: np.ndarray | None = None
    val_maps: np.ndarray | None = None
    skipped: list[dict] = field(default_factory=list)  # unreadable files, all roles


def without_labels(records: list[ImageRecord]) -> list[ImageRecord]:
    return [replace(r, label=UNKNOWN) for r in records]


def train_on_split(
    det: Detector,
    split: HealthyGANSplit,
    run_dir,
    *,
    work_dir=None,
    one_class_train: str = "healthy",
    progress: bool = True,
    is_main: bool = True,
    score_batch_size: int = 64,
    log: Callable[[str], None] | None = None,
) -> TrainedRun | None:
    """Steps 1-3 of the module docstring. `work_dir` (default: `run_dir`) holds the training checkpoints.
    In a distributed run every rank trains; only rank 0 (`is_main`) saves and scores, the others get None."""
    if one_class_train not in ONE_CLASS_TRAIN:
        raise ScanomalyError(f"one_class_train must be one of {ONE_CLASS_TRAIN}, got {one_class_train!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if det.needs_unlabeled and not split.unlabeled:
        raise ScanomalyError(f"method {det.name!r} also trains on unlabeled (mixed) images: give --unlabeled DIR, "
                             "or --from-labeled DIR to build the split")
    prep, skipped = det.preprocessing, []

    def load(records, desc):
        images = load_images(records, prep, progress=progress, desc=desc)
        skipped.extend(images.skipped)
        return images

    healthy = load(split.healthy, "B (healthy)")
    unlabeled = load(without_labels(split.unlabeled), "A (unlabeled)") if det.needs_unlabeled else None
    holdout = None
    if split.healthy_holdout and (det.takes_holdout or one_class_train == "all_normals"):
        holdout = load(split.healthy_holdout, "healthy hold-out")
    train = healthy
    if not det.needs_unlabeled and one_class_train == "all_normals":
        # a ceiling, not the protocol: A's normals are picked by their labels
        normals = load([r for r in split.unlabeled if r.label == NORMAL], "A's normals")
        train = _concat(*(s for s in (healthy, holdout, normals) if s is not None))
    counts = {"healthy": len(train), "unlabeled": len(unlabeled) if unlabeled is not None else 0,
              "holdout": len(holdout) if holdout is not None and det.takes_holdout else 0}
    if log is not None:
        log(f"training {det.name} on {len(train)} healthy"
            + (f" + {len(unlabeled)} unlabeled" if unlabeled is not None else "") + f" image(s), device {det.device}")

    fit_options = {"work_dir": run_dir if work_dir is None else work_dir, "progress": progress}
    if det.takes_holdout and holdout is not None:
        fit_options["holdout"] = holdout
    t0 = time.perf_counter()
    det.fit(train, unlabeled, **fit_options)
    train_seconds = time.perf_counter() - t0 + det.training_seconds_before_resume()
    if not is_main:  # the ranks end with identical models: rank 0 saves and scores
        return None
    model_dir = det.save(run_dir / "model")

    trained = TrainedRun(det, model_dir, counts, train_seconds, skipped=skipped)
    if split.val:
        trained.val = load(split.val, "validation")
        trained.val_scores, trained.val_maps = det.score(trained.val, batch_size=score_batch_size)
        roles = {(r.path, r.index): ("healthy_holdout" if r.label == NORMAL else "val_abnormal") for r in split.val}
        write_scores_csv(run_dir / VAL_SCORES, trained.val.records, trained.val_scores,
                         extra={"role": [roles.get((r.path, r.index), "") for r in trained.val.records]})
    return trained


def _concat(*sets: ImageSet) -> ImageSet:
    return ImageSet(images=torch.cat([s.images for s in sets]), records=[r for s in sets for r in s.records])


# ------------------------------------------------------------------------------------------
# one benchmark run: train, then test once
# ------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mib() -> float | None:
    try:
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001 - measuring memory must never break a run
        pass
    return None


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
    split: HealthyGANSplit | None = None,  # the benchmark's shared split; None: OUT/split.csv, else a new one
) -> dict:
    """Train and test one method on one labeled data set by the HealthyGAN protocol (the module docstring);
    writes OUT/result.json and returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cls = get_method(method)
    overrides = {"seed": seed, **(config_overrides or {})}
    det = cls.from_profile(profile, overrides, preprocessing_overrides, device=device, precision=precision)

    split_csv = out_dir / "split.csv"
    if split is None and split_csv.is_file():  # a resumed run reuses its split exactly
        split = read_split_manifest(split_csv)
    elif split is None:
        split = make_healthygan_split(discover(data), abnormal_fraction=abnormal_fraction, seed=split_seed)
    if not split_csv.is_file():
        write_split_manifest(split, split_csv)

    trained = train_on_split(det, split, out_dir, work_dir=out_dir / "train", one_class_train=one_class_train,
                             progress=progress)
    val = trained.val if trained.val is not None else load_images([], det.preprocessing, progress=False)
    val_scores = trained.val_scores if trained.val_scores is not None else np.zeros(0)
    val_maps = trained.val_maps if trained.val_maps is not None else np.zeros((0,) * 3, np.float32)
    test = load_images(split.test, det.preprocessing, progress, "test")
    test_scores, test_maps, images_per_second = timed_score(det, test)
    result = {
        "method": method,
        "profile": profile,
        "seed": seed,
        "split_seed": split_seed,
        "data": str(data),
        "precision": precision,
        "device": str(det.device),
        "image_size": det.preprocessing.image_size,
        "preprocessing": det.preprocessing.to_dict(),
        "split": split_counts(split),
        "train_seconds": trained.train_seconds,
        "scoring_images_per_second": images_per_second,
        "peak_rss_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "test": _evaluate_rules(test.labels, test_scores, val.labels, val_scores, seed, n_bootstrap),
        "extra": det.extra_state(),
    }
    train_result = getattr(det, "train_result", None)
    if train_result is not None:
        result["iterations_per_second"] = train_result.iterations_per_second
    gpu = peak_gpu_mib()
    if gpu is not None:
        result["peak_gpu_mib"] = gpu
    result.update(_localization_and_anatomy(data, out_dir, test, test_scores, test_maps, val, val_scores, val_maps,
                                            pixel_region))
    write_scores_csv(out_dir / TEST_SCORES, test.records, test_scores)
    save_score_gallery(out_dir / SCORE_GALLERY, det, test, test_scores, test_maps)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------
# what the report's gallery shows, saved while the model is at hand
# ------------------------------------------------------------------------------------------
GALLERY_PER_END = 8  # the most and the least anomalous test images kept per run
GALLERY_SIZE = 64  # pixels: scans, maps and reconstructions are kept at most this wide


def save_score_gallery(path: Path, det: Detector, test: ImageSet, scores: np.ndarray, maps: np.ndarray) -> None:
    """The report ranks test images by one method's scores and shows every method's map of them: so each run
    keeps every test image's map and scan, reduced to GALLERY_SIZE pixels (float16 / uint8), and its
    reconstruction (the healthy translation) where the method has one, for the most and least anomalous
    GALLERY_PER_END images by its own scores. Keys: paths, indices, scores, scans, maps, and recon_rows / recons."""
    if len(test) == 0:
        return
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ends = np.unique(np.r_[order[:GALLERY_PER_END], order[::-1][:GALLERY_PER_END]])
    recon = det.reconstruct(test.subset(ends))
    arrays = {
        "paths": np.array([r.path for r in test.records]),
        "indices": np.array([-1 if r.index is None else r.index for r in test.records], dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float64),
        "scans": _to_uint8(_reduce(test.images.mean(1).numpy())),
        "maps": _reduce(np.asarray(maps, dtype=np.float32)).astype(np.float16),
    }
    if recon is not None:
        arrays["recon_rows"] = ends.astype(np.int64)
        arrays["recons"] = _to_uint8(_reduce(np.asarray(recon, dtype=np.float32).mean(1)))
    np.savez_compressed(path, **arrays)


def _reduce(a: np.ndarray) -> np.ndarray:
    """[N, S, S] -> [N, s, s] with s <= GALLERY_SIZE (area averaging)."""
    if a.shape[-1] <= GALLERY_SIZE:
        return a
    t = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None],
                                                GALLERY_SIZE)
    return t[:, 0].numpy()


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8."""
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


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
