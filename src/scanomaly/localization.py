"""Localisation: do the anomaly maps point at the lesion? Pixel metrics against ground-truth masks,
slice-position-matched and patient-level views of the image scores, and the stored gallery the
report draws (heatmaps with the ground-truth outline).

Maps and masks are [N, S, S] at the model's resolution: masks go through the image's own
preprocessing (`Preprocessing.apply_mask`, nearest neighbour), so pixel (i, j) of a map and of its
mask are the same place of the scan. Higher map values = more anomalous; a pixel is called abnormal
when `value >= threshold`, as image scores are (metrics.py).

Pixel metrics (`evaluate_localization`):
- pixel AUROC: scikit-learn's `roc_auc_score` over every pixel of the test slices (normal slices
  included: their pixels are all negatives). Above `max_normal_pixels` negatives, a fixed random
  subset of negative pixels (seeded, so deterministic) is used and the count reported; every lesion
  pixel is always kept. The AUROC is unchanged in expectation by uniform subsampling of negatives.
- AUPRO: the per-region overlap curve of the MVTec AD evaluation (Bergmann et al., IJCV 2021, and
  its reference code): connected components of every mask (8-connectivity, within one slice) are
  the regions; for each threshold, PRO = mean over all regions of the fraction of the region's
  pixels at or above it, FPR = the fraction of negative pixels at or above it. Every distinct map
  value is a threshold (the curve is exact, from one sort). The area under PRO(FPR) for FPR in
  [0, 0.3] (the curve interpolated at 0.3) is divided by 0.3, so a perfect map scores 1.
- Dice: 2|P ∩ G| / (|P| + |G|) per slice with a lesion, at one threshold chosen on the validation
  maps as the one that maximises that mean Dice (never on test). Reported: the mean over the test
  slices with a lesion (`dice`), and the Dice of all test pixels pooled, normal slices included, so
  that false alarms on lesion-free slices count (`dice_global`).
- Region: "foreground" restricts every metric to the head, a per-slice foreground mask from
  intensity (`foreground_mask`: > 10% of the slice's 99th percentile, largest connected component,
  holes filled; the scans are not skull-stripped, so it holds skull and scalp too); "all" uses
  every pixel (as MVTec AD and BMAD do). Background air is trivially normal, so "all" reads higher.
  Both are computed; `region` names the one reported as the headline numbers.

Anatomy (`slice_matched`): on lgg_flair the normal slices sit lower in the head than the lesion
slices, so an image score can separate them by anatomy. The relative slice position (slice_index
− 0.5) / n_slices comes from the data's manifest; the image AUROC is recomputed among test slices
in the middle third of positions, and a position-only detector (the abnormal rate per position bin,
fitted on the validation slices) measures how much position alone explains.

Patients (`patient_level`, `per_patient`): patient scores from slice scores (mean, max, top-k mean,
`metrics.patient_scores`) with their AUROC when the test patients include both classes; and,
patient by patient, the slice AUROC within the patient, the pixel AUROC over its slices and its
mean Dice, summarised over patients.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage  # a dependency of scikit-learn, so always installed with scanomaly
from sklearn.metrics import roc_auc_score

from .errors import ScanomalyError

REGIONS = ("foreground", "all")
FPR_LIMIT = 0.3
MAX_NORMAL_PIXELS = 5_000_000
MIDDLE_THIRD = (1.0 / 3.0, 2.0 / 3.0)
GALLERY_FILE = "localization_gallery.npz"
PER_PATIENT_FILE = "localization_per_patient.csv"
_EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity, as in the MVTec AD evaluation code


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _as_maps(maps) -> np.ndarray:
    a = np.asarray(maps, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ScanomalyError(f"anomaly maps must be [N, H, W], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ScanomalyError(f"{int((~np.isfinite(a)).sum())} anomaly-map value(s) are NaN or inf")
    return a


def _as_masks(masks, shape) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    m = m > 0.5 if m.dtype != bool else m
    if m.shape != tuple(shape):
        raise ScanomalyError(f"masks have shape {m.shape}, the anomaly maps {tuple(shape)}")
    return m


def _as_region(region, shape) -> np.ndarray:
    if region is None:
        return np.ones(shape, dtype=bool)
    return _as_masks(region, shape)


def foreground_mask(images, fraction: float = 0.1, percentile: float = 99.0) -> np.ndarray:
    """Per slice: pixels brighter than `fraction` x the slice's `percentile`-th intensity, the largest
    connected component, holes filled. `images`: [N, C, S, S] or [N, S, S] model tensors in [-1, 1].
    A slice where nothing qualifies gets an all-True mask (it is then evaluated everywhere).
    On head MRI this is the head (brain, skull and scalp); the rule is the one SOURCE.md of
    lgg_flair used to drop near-empty slices."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=1)
    if x.ndim != 3:
        raise ScanomalyError(f"expected images [N, C, S, S] or [N, S, S], got shape {x.shape}")
    unit = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    out = np.ones(unit.shape, dtype=bool)
    for i, img in enumerate(unit):
        thr = fraction * float(np.percentile(img, percentile))
        fg = img > thr
        if thr <= 0 or not fg.any():
            continue
        labeled, n = ndimage.label(fg, structure=_EIGHT)
        if n > 1:
            sizes = np.bincount(labeled.ravel())
            sizes[0] = 0
            fg = labeled == int(np.argmax(sizes))
        out[i] = ndimage.binary_fill_holes(fg)
    return out


# ------------------------------------------------------------------------------------------
# pixel AUROC and AUPRO
# ------------------------------------------------------------------------------------------
def _negative_keep(n_negative: int, max_normal_pixels: int | None, seed: int) -> np.ndarray | None:
    if max_normal_pixels is None or n_negative <= max_normal_pixels:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_negative, size=int(max_normal_pixels), replace=False))


def _pixels(maps, masks, region, max_normal_pixels, seed):
    """(negative values, positive values, n negatives before subsampling)."""
    a = _as_maps(maps)
    m = _as_masks(masks, a.shape)
    r = _as_region(region, a.shape)
    neg = a[r & ~m]
    pos = a[r & m]
    n_neg = neg.size
    keep = _negative_keep(n_neg, max_normal_pixels, seed)
    if keep is not None:
        neg = neg[keep]
    return neg, pos, n_neg


def pixel_auroc(maps, masks, region=None, max_normal_pixels: int | None = MAX_NORMAL_PIXELS, seed: int = 0) -> float:
    """ROC AUC of pixel values against mask pixels (inside `region` when given)."""
    neg, pos, _ = _pixels(maps, masks, region, max_normal_pixels, seed)
    if pos.size == 0 or neg.size == 0:
        raise ScanomalyError("pixel AUROC needs lesion and non-lesion pixels; "
                             f"got {pos.size} lesion and {neg.size} other pixel(s)")
    y = np.r_[np.zeros(neg.size, dtype=np.int8), np.ones(pos.size, dtype=np.int8)]
    return float(roc_auc_score(y, np.r_[neg, pos]))


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of every slice's mask (8-connectivity, never across slices):
    (labels [N, H, W], 0 = background, unique over the stack; number of regions)."""
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = _EIGHT
    labeled, n = ndimage.label(masks, structure=structure)
    return labeled, int(n)


def pro_curve(maps, masks, region=None, max_normal_pixels: int | None = MAX_NORMAL_PIXELS, seed: int = 0):
    """(fpr, pro) over every distinct map value as threshold, in increasing FPR, starting at (0, 0).
    Regions are the connected components of mask ∩ region; negatives are region pixels off the mask."""
    a = _as_maps(maps)
    m = _as_masks(masks, a.shape) & _as_region(region, a.shape)
    r = _as_region(region, a.shape)
    labeled, n_regions = _regions(m)
    if n_regions == 0:
        raise ScanomalyError("AUPRO needs at least one lesion region")
    sizes = np.bincount(labeled.ravel())
    pos_labels = labeled[m]
    pos = a[m]
    pos_w = 1.0 / (sizes[pos_labels] * float(n_regions))  # each region weighs 1 / n_regions in total
    neg = a[r & ~m]
    keep = _negative_keep(neg.size, max_normal_pixels, seed)
    if keep is not None:
        neg = neg[keep]
    if neg.size == 0:
        raise ScanomalyError("AUPRO needs pixels outside the lesions")
    values = np.r_[neg, pos]
    fp_w = np.r_[np.full(neg.size, 1.0 / neg.size), np.zeros(pos.size)]
    pro_w = np.r_[np.zeros(neg.size), pos_w]
    order = np.argsort(-values, kind="stable")
    v = values[order]
    fpr = np.cumsum(fp_w[order])
    pro = np.cumsum(pro_w[order])
    last_of_tie = np.r_[v[1:] != v[:-1], True]  # a threshold flags every pixel of its value
    fpr = np.clip(np.r_[0.0, fpr[last_of_tie]], 0.0, 1.0)
    pro = np.clip(np.r_[0.0, pro[last_of_tie]], 0.0, 1.0)
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit]; x is non-decreasing, y interpolated at the limit."""
    idx = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:idx], y[:idx]
    if idx < len(x) and xs[-1] < limit:
        x0, x1, y0, y1 = x[idx - 1], x[idx], y[idx - 1], y[idx]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps, masks, region=None, fpr_limit: float = FPR_LIMIT,
          max_normal_pixels: int | None = MAX_NORMAL_PIXELS, seed: int = 0) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1 = perfect)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ScanomalyError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, region, max_normal_pixels, seed)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# ------------------------------------------------------------------------------------------
# Dice
# ------------------------------------------------------------------------------------------
def _dice_counts(maps: np.ndarray, masks: np.ndarray, region: np.ndarray, thresholds: np.ndarray):
    """Per slice and threshold: (predicted pixels, true positives, lesion pixels), [N, T] each."""
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n = len(maps)
    pred = np.zeros((n, len(thresholds)), dtype=np.int64)
    tp = np.zeros_like(pred)
    lesion = np.zeros(n, dtype=np.int64)
    for i in range(n):
        v = np.sort(maps[i][region[i]].astype(np.float64))
        lv = np.sort(maps[i][region[i] & masks[i]].astype(np.float64))
        pred[i] = v.size - np.searchsorted(v, thresholds, side="left")  # values >= threshold
        tp[i] = lv.size - np.searchsorted(lv, thresholds, side="left")
        lesion[i] = lv.size
    return pred, tp, lesion


def dice_scores(maps, masks, threshold: float, region=None) -> np.ndarray:
    """Dice of (map >= threshold) against the mask, per slice, inside `region`; NaN for a slice
    without lesion pixels (Dice is undefined there; see `dice_global` for false alarms)."""
    a = _as_maps(maps)
    m = _as_masks(masks, a.shape)
    r = _as_region(region, a.shape)
    pred, tp, lesion = _dice_counts(a, m, r, [threshold])
    pred, tp = pred[:, 0], tp[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lesion > 0, 2.0 * tp / (pred + lesion), np.nan)


def dice_global(maps, masks, threshold: float, region=None) -> float:
    """Dice of all pixels pooled (every slice, lesion-free ones included)."""
    a = _as_maps(maps)
    m = _as_masks(masks, a.shape)
    r = _as_region(region, a.shape)
    pred = (a >= threshold) & r
    gt = m & r
    denom = int(pred.sum()) + int(gt.sum())
    return float(2.0 * int((pred & gt).sum()) / denom) if denom else float("nan")


def dice_candidates(maps, region=None, n: int = 300) -> np.ndarray:
    """Candidate thresholds: quantiles of the map values (inside `region`), dense in the upper tail,
    where lesions (a few % of a slice) put the best threshold."""
    a = _as_maps(maps)
    values = a[_as_region(region, a.shape)].astype(np.float64)
    if values.size == 0:
        raise ScanomalyError("no pixels to choose a threshold from")
    levels = np.unique(np.r_[np.linspace(0.0, 0.9, n // 3), 1.0 - np.geomspace(0.1, 1e-5, n - n // 3), 1.0])
    return np.unique(np.quantile(values, levels))


def choose_dice_threshold(maps, masks, region=None, n_candidates: int = 300) -> tuple[float, float, int]:
    """(threshold, its mean Dice, slices used): the candidate that maximises the mean Dice over the
    slices with lesion pixels (ties: the highest threshold). For validation maps only."""
    a = _as_maps(maps)
    m = _as_masks(masks, a.shape)
    r = _as_region(region, a.shape)
    has = (m & r).reshape(len(a), -1).any(1)
    if not has.any():
        raise ScanomalyError("choosing a Dice threshold needs slices with lesion pixels")
    cands = dice_candidates(a, r, n_candidates)
    pred, tp, lesion = _dice_counts(a[has], m[has], r[has], cands)
    dice = 2.0 * tp / (pred + lesion[:, None])
    mean = dice.mean(axis=0)
    best = np.flatnonzero(mean >= mean.max() - 1e-12)[-1]
    return float(cands[best]), float(mean[best]), int(has.sum())


# ------------------------------------------------------------------------------------------
# everything for one run
# ------------------------------------------------------------------------------------------
def _region_block(test_maps, test_masks, test_region, val_maps, val_masks, val_region, fpr_limit,
                  max_normal_pixels, seed) -> dict:
    out: dict = {}
    neg, pos, n_neg = _pixels(test_maps, test_masks, test_region, max_normal_pixels, seed)
    out["n_pixels"] = int(n_neg + pos.size)
    out["n_lesion_pixels"] = int(pos.size)
    out["normal_pixels_used"] = int(neg.size)
    out["normal_pixels_subsampled"] = bool(neg.size < n_neg)
    out["pixel_auroc"] = pixel_auroc(test_maps, test_masks, test_region, max_normal_pixels, seed) \
        if pos.size and neg.size else None
    out["aupro"] = aupro(test_maps, test_masks, test_region, fpr_limit, max_normal_pixels, seed) \
        if pos.size and neg.size else None
    out["dice"] = out["dice_global"] = out["dice_threshold"] = out["val_dice"] = None
    out["dice_threshold_source"] = None
    if val_maps is not None and val_masks is not None and (np.asarray(val_masks) & val_region).any():
        thr, val_dice, n_val = choose_dice_threshold(val_maps, val_masks, val_region)
        per_slice = dice_scores(test_maps, test_masks, thr, test_region)
        out["dice_threshold"] = thr
        out["val_dice"] = val_dice
        out["dice_threshold_source"] = f"validation: maximises the mean Dice of {n_val} validation slices with a lesion"
        out["dice"] = float(np.nanmean(per_slice)) if np.isfinite(per_slice).any() else None
        out["dice_global"] = dice_global(test_maps, test_masks, thr, test_region)
    return out


def evaluate_localization(test_maps, test_masks, test_images=None, val_maps=None, val_masks=None, val_images=None,
                          region: str = "foreground", fpr_limit: float = FPR_LIMIT,
                          max_normal_pixels: int | None = MAX_NORMAL_PIXELS, seed: int = 0,
                          test_region=None, val_region=None) -> dict:
    """The "localization" block of result.json: the headline metrics for `region`, and the same
    metrics over all pixels under "all_pixels" (when `region` is "foreground"). The foreground is
    `test_region` / `val_region` when given, else computed from `test_images` / `val_images`
    (model tensors) by `foreground_mask`."""
    if region not in REGIONS:
        raise ScanomalyError(f"region must be one of {REGIONS}, got {region!r}")
    a = _as_maps(test_maps)
    m = _as_masks(test_masks, a.shape)
    va = _as_maps(val_maps) if val_maps is not None else None
    vm = _as_masks(val_masks, va.shape) if va is not None and val_masks is not None else None
    ones_t = np.ones(a.shape, dtype=bool)
    ones_v = np.ones(va.shape, dtype=bool) if va is not None else None
    if region == "foreground":
        if (test_region is None and test_images is None) or (va is not None and val_region is None
                                                             and val_images is None):
            raise ScanomalyError("the foreground region needs the images (test_images, val_images)")
        reg_t = _as_region(test_region, a.shape) if test_region is not None else foreground_mask(test_images)
        reg_v = None
        if va is not None:
            reg_v = _as_region(val_region, va.shape) if val_region is not None else foreground_mask(val_images)
    else:
        reg_t, reg_v = ones_t, ones_v
    head = _region_block(a, m, reg_t, va, vm, reg_v, fpr_limit, max_normal_pixels, seed)
    lesion = int(m.sum())
    out = {
        "region": region,
        "region_rule": ("foreground: per slice, intensity > 10% of its 99th percentile, largest component, holes "
                        "filled (head incl. skull: the scans are not skull-stripped)") if region == "foreground"
        else "all pixels",
        **head,
        "fpr_limit": fpr_limit,
        "n_images": int(len(a)),
        "n_lesion_images": int(m.reshape(len(m), -1).any(1).sum()),
        "n_regions": _regions(m & reg_t)[1],
        "lesion_pixels_outside_region": float((m & ~reg_t).sum() / lesion) if lesion else 0.0,
        "map_size": list(a.shape[1:]),
        "max_normal_pixels": max_normal_pixels,
    }
    if region == "foreground":
        out["foreground_fraction"] = float(reg_t.mean())
        out["all_pixels"] = _region_block(a, m, ones_t, va, vm, ones_v, fpr_limit, max_normal_pixels, seed)
    return out


# ------------------------------------------------------------------------------------------
# patients
# ------------------------------------------------------------------------------------------
def patient_level(scores, labels, patient_ids, k: int = 3) -> dict:
    """Patient AUROC from slice scores reduced by mean, max and top-k mean, when the test patients
    include both normal and abnormal ones (a patient is abnormal when any slice is)."""
    from .metrics import patient_scores

    ids = list(patient_ids)
    if not ids or any(p in (None, "") for p in ids):
        return {"available": False, "note": "not every test image has a patient id"}
    out: dict = {"k": k}
    for reduce in ("mean", "max", "topk_mean"):
        ps, py, pid = patient_scores(scores, ids, labels, reduce=reduce, k=k)
        out["n_patients"] = len(pid)
        out["n_abnormal_patients"] = int(py.sum())
        out[f"auroc_{reduce}"] = float(roc_auc_score(py, ps)) if 0 < py.sum() < len(py) else None
    out["available"] = out["auroc_mean"] is not None
    if not out["available"]:
        out["note"] = (f"all {out['n_patients']} test patients are "
                       f"{'abnormal' if out['n_abnormal_patients'] else 'normal'}: no patient-level AUROC")
    return out


def _auroc_or_none(y, s) -> float | None:
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def per_patient(scores, labels, patient_ids, maps=None, masks=None, region=None, threshold=None) -> list[dict]:
    """One row per patient: slices, abnormal slices, the slice AUROC within the patient, and (with
    maps) the pixel AUROC over its slices and its mean Dice at `threshold`."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patient_ids):
        if p not in (None, ""):
            groups.setdefault(str(p), []).append(i)
    a = _as_maps(maps) if maps is not None else None
    m = _as_masks(masks, a.shape) if a is not None and masks is not None else None
    r = _as_region(region, a.shape) if a is not None else None
    rows = []
    for pid in sorted(groups):
        idx = np.asarray(groups[pid])
        row = {"patient_id": pid, "n": int(len(idx)), "n_abnormal": int((y[idx] == 1).sum()),
               "slice_auroc": _auroc_or_none(y[idx] == 1, s[idx])}
        if m is not None:
            pos = a[idx][m[idx] & r[idx]]
            neg = a[idx][~m[idx] & r[idx]]
            row["pixel_auroc"] = (float(roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], np.r_[neg, pos]))
                                  if pos.size and neg.size else None)
            row["dice"] = None
            if threshold is not None:
                d = dice_scores(a[idx], m[idx], threshold, r[idx])
                row["dice"] = float(np.nanmean(d)) if np.isfinite(d).any() else None
        rows.append(row)
    return rows


def summarize_per_patient(rows: list[dict]) -> dict:
    out: dict = {"n_patients": len(rows)}
    for key in ("slice_auroc", "pixel_auroc", "dice"):
        vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
        if vals.size:
            q25, med, q75 = (float(v) for v in np.percentile(vals, [25, 50, 75]))
            out[key] = {"mean": float(vals.mean()), "median": med, "q25": q25, "q75": q75, "n": int(vals.size)}
    return out


def write_per_patient(rows: list[dict], path) -> Path:
    path = Path(path)
    cols = ["patient_id", "n", "n_abnormal", "slice_auroc", "pixel_auroc", "dice"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in cols])
    return path


# ------------------------------------------------------------------------------------------
# slice position (anatomy)
# ------------------------------------------------------------------------------------------
def read_slice_positions(data) -> dict[str, float]:
    """normalised image path -> relative slice position in (0, 1), from the data's manifest (the CSV
    itself, or DIR/manifest.csv): a `slice_position` column, or `slice_index` (1-based) and
    `n_slices`, giving (slice_index − 0.5) / n_slices. {} when there is no such manifest."""
    p = Path(data)
    manifest = p if p.is_file() and p.suffix.lower() == ".csv" else p / "manifest.csv"
    if not manifest.is_file():
        return {}
    out = {}
    try:
        with open(manifest, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not ({"path", "file"} & cols) or not ("slice_position" in cols or {"slice_index", "n_slices"} <= cols):
                return {}
            for row in reader:
                raw = (row.get("path") or row.get("file") or "").strip()
                try:
                    if (row.get("slice_position") or "").strip():
                        pos = float(row["slice_position"])
                    else:
                        pos = (float(row["slice_index"]) - 0.5) / float(row["n_slices"])
                except (KeyError, TypeError, ValueError, ZeroDivisionError):
                    continue
                if raw and math.isfinite(pos):
                    out[os.path.normpath(str(manifest.parent / raw))] = pos
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return out


def positions_of(records, positions: dict[str, float]) -> np.ndarray:
    return np.array([positions.get(os.path.normpath(r.path), np.nan) for r in records], dtype=np.float64)


def position_only_scores(val_positions, val_labels, positions, bins: int = 10) -> np.ndarray:
    """A detector that sees only the slice position: the (smoothed) abnormal rate of the validation
    slices in the position's bin."""
    vp, vy = np.asarray(val_positions, dtype=np.float64), np.asarray(val_labels)
    ok = np.isfinite(vp)
    edges = np.linspace(0.0, 1.0, bins + 1)
    vb = np.clip(np.digitize(vp[ok], edges) - 1, 0, bins - 1)
    n = np.bincount(vb, minlength=bins)
    k = np.bincount(vb, weights=(vy[ok] == 1).astype(float), minlength=bins)
    rate = (k + 1.0) / (n + 2.0)
    b = np.clip(np.digitize(np.asarray(positions, dtype=np.float64), edges) - 1, 0, bins - 1)
    return rate[b]


def position_binned_auroc(scores, labels, positions, bins: int = 10) -> tuple[float | None, int]:
    """AUROC over the (abnormal, normal) pairs whose slices lie in the same tenth of their volumes
    (a pair-count-weighted mean of per-bin AUROCs): position cannot separate such pairs, so a
    position-only detector scores 0.5 here by construction. Returns (AUROC or None, pairs)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) == 1
    pos = np.asarray(positions, dtype=np.float64)
    ok = np.isfinite(pos)
    b = np.clip(np.digitize(pos, np.linspace(0.0, 1.0, bins + 1)) - 1, 0, bins - 1)
    total, pairs = 0.0, 0
    for k in range(bins):
        sel = ok & (b == k)
        n_pos, n_neg = int(y[sel].sum()), int((~y[sel]).sum())
        if n_pos and n_neg:
            total += roc_auc_score(y[sel], s[sel]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return (total / pairs if pairs else None), pairs


def slice_matched(scores, labels, positions, val_labels=None, val_positions=None,
                  low: float = MIDDLE_THIRD[0], high: float = MIDDLE_THIRD[1]) -> dict:
    """Image AUROC among test slices with low <= position < high, beside the full-test AUROC; the
    AUROC over abnormal-normal pairs in the same tenth of the volume (`position_binned_auroc`); and
    the AUROC of a position-only detector fitted on validation (full test and middle third)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    pos = np.asarray(positions, dtype=np.float64)
    known = np.isfinite(pos)
    sel = known & (pos >= low) & (pos < high)
    out = {
        "range": [low, high],
        "position": "(slice_index - 0.5) / n_slices",
        "n_with_position": int(known.sum()),
        "n": int(sel.sum()),
        "n_abnormal": int((y[sel] == 1).sum()),
        "auroc": _auroc_or_none(y[sel] == 1, s[sel]),
        "auroc_all": _auroc_or_none(y == 1, s),
        "median_position_normal": float(np.median(pos[known & (y == 0)])) if (known & (y == 0)).any() else None,
        "median_position_abnormal": float(np.median(pos[known & (y == 1)])) if (known & (y == 1)).any() else None,
        "position_only_auroc": None,
        "position_only_auroc_matched": None,
    }
    out["auroc_position_bins"], out["n_pairs_position_bins"] = position_binned_auroc(s, y, pos)
    if val_labels is not None and val_positions is not None and np.isfinite(np.asarray(val_positions, float)).any():
        ps = position_only_scores(val_positions, val_labels, np.where(known, pos, 0.5))
        out["position_only_auroc"] = _auroc_or_none(y[known] == 1, ps[known])
        out["position_only_auroc_matched"] = _auroc_or_none(y[sel] == 1, ps[sel])
        out["position_only_rule"] = "abnormal rate per tenth of the position range, on the validation slices"
    return out


# ------------------------------------------------------------------------------------------
# the gallery the report draws
# ------------------------------------------------------------------------------------------
def _lesion_fraction(rec, fallback: float) -> float:
    """Lesion area fraction from the mask file at its own resolution, so the ranking (and the
    gallery) is the same for methods at different model resolutions."""
    from .io import read_image

    try:
        mask = read_image(rec.mask_path)[0]
        return float((np.asarray(mask) > 0.5).mean())
    except Exception:  # noqa: BLE001 - the gallery choice must not fail a run
        return fallback


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def gallery_indices(records, masks, n_abnormal: int = 6, n_normal: int = 2, positions=None) -> list[int]:
    """Test slices for the gallery, chosen from the records and masks only (never from scores), so
    every method shows the same slices: one slice per patient (its largest lesion), patients spread
    over lesion sizes from the largest to the smallest; then lesion-free slices, from other patients
    where there are any (in the middle third of positions when known), in a fixed hash order."""
    m = np.asarray(masks)
    pid = [r.patient_id or r.path for r in records]
    frac = {}
    for i, r in enumerate(records):
        if r.label == 1 and m[i].any():
            frac[i] = _lesion_fraction(r, float(m[i].mean())) if r.mask_path else float(m[i].mean())
    best: dict[str, int] = {}
    for i, f in frac.items():
        if pid[i] not in best or (f, records[best[pid[i]]].path) > (frac[best[pid[i]]], records[i].path):
            best[pid[i]] = i
    ranked = sorted(best.values(), key=lambda i: (-frac[i], records[i].path))
    if len(ranked) > n_abnormal:
        ranked = [ranked[int(round(j))] for j in np.linspace(0, len(ranked) - 1, n_abnormal)]
    chosen = list(dict.fromkeys(ranked))
    used = {pid[i] for i in chosen}
    pos = np.asarray(positions, dtype=np.float64) if positions is not None else np.full(len(records), np.nan)
    normals = [i for i, r in enumerate(records) if r.label == 0]
    mid = [i for i in normals if MIDDLE_THIRD[0] <= pos[i] < MIDDLE_THIRD[1]]
    pool = sorted(mid or normals, key=lambda i: _hash(records[i].path))
    want = len(chosen) + n_normal
    for other_patients_only in (True, False):  # when every test patient has a lesion slice shown, any patient
        for i in pool:
            if len(chosen) >= want:
                break
            if i not in chosen and (pid[i] not in used or not other_patients_only):
                chosen.append(i)
                used.add(pid[i])
    return chosen


def save_gallery(path, idx, records, images, masks, maps, region=None, threshold=None, val_maps=None) -> Path:
    """The gallery slices of one run, compact: images, maps (float16), masks, region (bool), the
    validation-chosen Dice threshold and a display range from the validation maps."""
    idx = list(idx)
    x = np.asarray(images, dtype=np.float32)[idx]
    gray = np.clip((x.mean(axis=1) if x.ndim == 4 else x) * 0.5 + 0.5, 0, 1)
    a = np.asarray(maps, dtype=np.float32)
    ref = np.asarray(val_maps, dtype=np.float32) if val_maps is not None and np.size(val_maps) else a
    lo, hi = (float(v) for v in np.percentile(ref, [1.0, 99.9]))
    np.savez_compressed(
        path,
        paths=np.array([records[i].path for i in idx], dtype=str),
        labels=np.array([records[i].label for i in idx], dtype=np.int64),
        patient_ids=np.array([records[i].patient_id or "" for i in idx], dtype=str),
        images=gray.astype(np.float16),
        masks=np.asarray(masks, dtype=bool)[idx],
        region=(np.asarray(region, dtype=bool)[idx] if region is not None
                else np.ones((len(idx),) + a.shape[1:], dtype=bool)),
        maps=a[idx].astype(np.float16),
        threshold=np.array(np.nan if threshold is None else threshold, dtype=np.float64),
        display_range=np.array([lo, hi if hi > lo else lo + 1e-6], dtype=np.float64),
    )
    return Path(path)


def load_gallery(path) -> dict:
    with np.load(str(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------
# words for results.md and the report
# ------------------------------------------------------------------------------------------
def notes_for_results(results: dict) -> list[str]:
    """Sentences for results.md and the report about the localisation and anatomy checks of a
    benchmark, from its runs' flat metrics (empty when no run has them)."""
    runs = [r for r in results.get("runs", []) if r.get("status") == "ok"]
    metrics = [r.get("metrics", {}) for r in runs]
    notes: list[str] = []
    if any(m.get("pixel_auroc") is not None for m in metrics):
        notes.append(
            "Localisation: every pixel of every test slice (lesion-free slices included) at the model's resolution, "
            "masks resized with the images (nearest neighbour). Headline columns: pixels inside the head foreground "
            "(per slice: intensity > 10% of its 99th percentile, largest component, holes filled; skull included); "
            "'all px' columns: every pixel, as MVTec AD and BMAD count them. AUPRO: the per-region overlap curve "
            f"integrated to FPR {FPR_LIMIT} and divided by it. Dice: mean over test slices with a lesion at the "
            "threshold that maximises it on the validation slices; 'pooled' counts all test pixels together, so "
            "false alarms on lesion-free slices lower it. Above "
            f"{MAX_NORMAL_PIXELS:,} negative pixels a fixed-seed subset of them is used (every lesion pixel kept).")
    pos = [m for m in metrics if m.get("position_only_auroc") is not None]
    if pos:
        m = pos[0]
        matched = m.get("position_only_auroc_matched")
        n, n_abn = m.get("slice_matched_n"), m.get("slice_matched_n_abnormal")
        notes.append(
            "Anatomy check: a detector that sees only the relative slice position (the abnormal rate per tenth of "
            f"the volume, fitted on the validation slices) reaches image AUROC {m['position_only_auroc']:.3f} on the "
            "whole test set"
            + (f" and {matched:.3f} among the test slices in the middle third of their volume" if matched is not None
               else "")
            + (f" ({int(n)} slices, {int(n_abn)} abnormal)" if n is not None and n_abn is not None else "")
            + "; the 'middle third' column is each method's image AUROC on those slices (position still differs "
              "within them). The 'same tenth' column counts only abnormal-normal pairs from the same tenth of "
              "their volumes, where position alone gives 0.5 by construction.")
    if any(m.get("within_patient_slice_auroc") is not None for m in metrics):
        notes.append("Within-patient columns: per test patient, the AUROC of its abnormal vs normal slices (image "
                     "scores) or pixels (maps), averaged over patients. Patient AUROC columns need test patients "
                     "of both classes (a patient is abnormal when any slice is); they are left out otherwise.")
    return notes
