"""The HealthyGAN split protocol: which labeled images a method may train on, and how.

HealthyGAN (Rahman Siddiquee et al.) trains on two sets: B, images known to be healthy, and A, a
mixed, unlabeled set of healthy and abnormal images. From a labeled data set we build:

- `healthy`          B, the known-healthy training set
- `healthy_holdout`  known-healthy images held out of training: label-free checkpoint selection,
                     and the normals of the validation set
- `unlabeled`        A, the mixed set; its records keep their true labels for analysis, but
                     training code must ignore them
- `val_abnormal`     labeled abnormal training images that are not in A, for choosing a threshold
- `test`             never seen in training or model selection
- `unused`           training images no role needed (the abnormals left over; see patient rule)

`val` = healthy_holdout + val_abnormal.

Rules (deterministic for a given seed; input order does not matter):
1. Test: records whose split is "test" (an official split) are the test set; otherwise
   `test_fraction` of each class is drawn at random (seeded, stratified).
2. The training normals are shuffled; the first `healthy_fraction` become B-candidates, the rest A's
   normals. `holdout_fraction` of the B-candidates become `healthy_holdout`, the rest `healthy`.
3. A gets n_abn = round(n_norm * f / (1 - f)) abnormals (f = `abnormal_fraction`), drawn from the
   training abnormals; when there are too few, all are used, with a warning.
4. `val_abnormal` takes `val_abnormal_count` (default: the size of healthy_holdout) of the abnormals
   left; the rest are `unused`.

Patient grouping: when records carry a `patient_id`, whole patients are assigned, so no patient
appears in two of healthy / healthy_holdout / unlabeled / val_abnormal / test (a patient's images
that its role cannot use go to `unused`, which is not a role). The unit of every draw above is then a
patient (a record without an id is its own unit), and counts are met as closely as whole patients
allow, counted in images:
- test patients first (official split: a patient with any test record is a test patient, and its
  training records go to `unused`; otherwise normal-only and abnormal-containing patients are drawn
  separately, `test_fraction` of each group's images);
- patients with only normal images are distributed to B-candidates / A's normals, then holdout;
  patients with abnormal images join B (their normal images only) only when the normal-only
  patients are too few to meet the B target;
- patients with abnormal images go to A, all their normal images and as many abnormal ones as the
  fraction needs, until A's abnormal fraction is reached; then to `val_abnormal`, which takes only
  their abnormal images;
- when no normal-only patient is left for A (every patient has abnormal slices, as in lgg_flair),
  `val_abnormal` patients are drawn first and every other patient goes to A, its abnormal slices
  subsampled to the fraction.
Without patient ids every image is its own unit and the rules reduce to the plain protocol above.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import ABNORMAL, NORMAL, UNKNOWN, ImageRecord
from .errors import ScanomalyError

ROLES = ("healthy", "healthy_holdout", "unlabeled", "val_abnormal", "test", "unused")
MANIFEST_COLUMNS = ("path", "label", "role", "patient_id", "split", "index", "mask_file")


@dataclass
class HealthyGANSplit:
    healthy: list[ImageRecord] = field(default_factory=list)
    healthy_holdout: list[ImageRecord] = field(default_factory=list)
    unlabeled: list[ImageRecord] = field(default_factory=list)
    val_abnormal: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)
    unused: list[ImageRecord] = field(default_factory=list)

    @property
    def val(self) -> list[ImageRecord]:
        return self.healthy_holdout + self.val_abnormal

    def role_of(self) -> dict[tuple[str, int | None], str]:
        return {(r.path, r.index): role for role in ROLES for r in getattr(self, role)}


# ------------------------------------------------------------------------------------------
# the split
# ------------------------------------------------------------------------------------------
def _key(r: ImageRecord) -> tuple[str, int]:
    return (r.path, -1 if r.index is None else r.index)


def _units(records: list[ImageRecord]) -> list[list[ImageRecord]]:
    """Records grouped by patient (a record without a patient id is its own unit), sorted by key."""
    groups: dict[str, list[ImageRecord]] = {}
    for r in records:
        k = f"patient:{r.patient_id}" if r.patient_id else f"image:{r.path}#{'' if r.index is None else r.index}"
        groups.setdefault(k, []).append(r)
    return [sorted(groups[k], key=_key) for k in sorted(groups)]


def _shuffled(units: list, rng: np.random.Generator) -> list:
    return [units[i] for i in rng.permutation(len(units))]


def _n_abnormal(unit) -> int:
    return sum(r.label == ABNORMAL for r in unit)


def _n_normal(unit) -> int:
    return sum(r.label == NORMAL for r in unit)


def _take(units: list[list[ImageRecord]], target: int, count=len) -> tuple[list, list]:
    """Take units in order while that brings the taken image count closer to `target`.

    With one image per unit this takes exactly `target` units."""
    taken, rest, total = [], [], 0
    for u in units:
        n = count(u)
        if total < target and abs(total + n - target) < abs(total - target):
            taken.append(u)
            total += n
        else:
            rest.append(u)
    return taken, rest


def _flat(units) -> list[ImageRecord]:
    return sorted((r for u in units for r in u), key=_key)


def make_healthygan_split(
    records: list[ImageRecord],
    abnormal_fraction: float = 0.3,
    healthy_fraction: float = 0.5,
    holdout_fraction: float = 0.1,
    val_abnormal_count: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> HealthyGANSplit:
    """Split labeled records by the HealthyGAN protocol (see the module docstring for the rules)."""
    if not records:
        raise ScanomalyError("make_healthygan_split: no records")
    for name, value, lo_ok, hi_ok in (
        ("abnormal_fraction", abnormal_fraction, True, False),
        ("healthy_fraction", healthy_fraction, False, True),
        ("holdout_fraction", holdout_fraction, True, False),
        ("test_fraction", test_fraction, True, False),
    ):
        if not ((0 <= value if lo_ok else 0 < value) and (value <= 1 if hi_ok else value < 1)):
            raise ScanomalyError(f"{name} must be in {'[' if lo_ok else '('}0, 1{']' if hi_ok else ')'}, got {value}")
    if val_abnormal_count is not None and val_abnormal_count < 0:
        raise ScanomalyError(f"val_abnormal_count must be >= 0, got {val_abnormal_count}")
    unlabeled_n = sum(r.label == UNKNOWN for r in records)
    if unlabeled_n:
        raise ScanomalyError(
            f"the HealthyGAN split needs labeled images (normal/abnormal); {unlabeled_n} of {len(records)} have no label"
        )

    rng = np.random.default_rng(seed)
    units = _units(records)
    unused: list[list[ImageRecord]] = []

    # 1. test
    if any(r.split == "test" for r in records):
        test_units, train_units = [], []
        for u in units:
            if any(r.split == "test" for r in u):
                test_units.append([r for r in u if r.split == "test"])
                if any(r.split != "test" for r in u):
                    unused.append([r for r in u if r.split != "test"])
            else:
                train_units.append(u)
        leaked = sum(len(u) for u in unused)
        if leaked:
            warnings.warn(f"{leaked} training image(s) belong to patients of the official test split; "
                          "they are left out of training (role 'unused')")
    else:
        normal_units = _shuffled([u for u in units if _n_abnormal(u) == 0], rng)
        abnormal_units = _shuffled([u for u in units if _n_abnormal(u) > 0], rng)
        test_units, train_units = [], []
        for group in (normal_units, abnormal_units):
            n_images = sum(len(u) for u in group)
            taken, rest = _take(group, round(test_fraction * n_images))
            test_units += taken
            train_units += rest
        train_units.sort(key=lambda u: _key(u[0]))

    # 2. healthy (B), holdout, A's normals. Normal-only units are preferred for B; units with abnormal
    #    images join B (their normal images only) only when the normal-only ones cannot meet the target.
    normal_units = _shuffled([u for u in train_units if _n_abnormal(u) == 0], rng)
    mixed_units = _shuffled([u for u in train_units if _n_abnormal(u) > 0], rng)
    n_normal_images = sum(_n_normal(u) for u in train_units)
    if n_normal_images == 0:
        raise ScanomalyError("the HealthyGAN split needs normal training images; found none")
    target_b = round(healthy_fraction * n_normal_images)
    b_candidates, a_normals = _take(normal_units, target_b, count=_n_normal)
    taken_b = sum(_n_normal(u) for u in b_candidates)
    if taken_b < target_b and not a_normals:
        more, mixed_units = _take(mixed_units, target_b - taken_b, count=_n_normal)
        b_candidates += more
    holdout, healthy = _take(b_candidates, round(holdout_fraction * sum(_n_normal(u) for u in b_candidates)),
                             count=_n_normal)
    if not healthy:
        raise ScanomalyError("the HealthyGAN split left no images for the healthy training set; "
                             "lower holdout_fraction or add normal images")
    for u in healthy + holdout:  # abnormal images of a B patient are not used
        unused.append([r for r in u if r.label == ABNORMAL])
    healthy = [[r for r in u if r.label == NORMAL] for u in healthy]
    holdout = [[r for r in u if r.label == NORMAL] for u in holdout]

    # 3./4. A and val_abnormal share the units with abnormal images. A is filled first: the other
    #    normal units plus abnormal-containing units until A holds round(n_norm * f / (1 - f))
    #    abnormal images (n_norm: A's normal images, the added units' included; the last unit's surplus
    #    abnormal images are not used). val_abnormal takes abnormal images of the units left.
    #    When no normal-only unit is left for A (every patient has abnormal slices, as in lgg_flair),
    #    A could only take normals from those patients: val_abnormal is drawn first, and every other
    #    patient goes to A, its abnormal slices subsampled to the fraction.
    ratio = abnormal_fraction / (1.0 - abnormal_fraction)
    a_units = list(a_normals)
    counts = {"norm": sum(len(u) for u in a_normals), "abn": 0}

    def add_to_a(u):
        normals = [r for r in u if r.label == NORMAL]
        abnormals = _shuffled([r for r in u if r.label == ABNORMAL], rng)
        counts["norm"] += len(normals)
        need = max(0, round(counts["norm"] * ratio) - counts["abn"])
        a_units.append(normals + abnormals[:need])
        unused.append(abnormals[need:])
        counts["abn"] += min(need, len(abnormals))

    n_holdout = sum(len(u) for u in holdout)
    want_val = n_holdout if val_abnormal_count is None else int(val_abnormal_count)
    val_first = not a_normals
    pool = list(mixed_units)
    if not val_first:
        while pool and counts["abn"] < round(counts["norm"] * ratio):
            add_to_a(pool.pop(0))
    val_abnormal, got_val, left = [], 0, []
    for u in pool:
        if got_val >= want_val:
            left.append(u)
            continue
        abnormals = _shuffled([r for r in u if r.label == ABNORMAL], rng)
        take = min(len(abnormals), want_val - got_val)
        val_abnormal.append(abnormals[:take])
        got_val += take
        unused.append([r for r in u if r.label != ABNORMAL] + abnormals[take:])
    if val_first:
        for u in left:
            add_to_a(u)
    else:
        unused += left
    wanted = round(counts["norm"] * ratio)
    if counts["abn"] < wanted:
        warnings.warn(f"only {counts['abn']} abnormal training image(s) available for the unlabeled set, "
                      f"{wanted} wanted for abnormal_fraction={abnormal_fraction}; using all of them")
    if got_val < want_val:
        warnings.warn(f"only {got_val} abnormal image(s) left for val_abnormal, {want_val} wanted")
    if not any(a_units):
        warnings.warn("the unlabeled set is empty")

    return HealthyGANSplit(
        healthy=_flat(healthy),
        healthy_holdout=_flat(holdout),
        unlabeled=_flat(a_units),
        val_abnormal=_flat(val_abnormal),
        test=_flat(test_units),
        unused=_flat(unused),
    )


def split_counts(split: HealthyGANSplit) -> dict:
    """{role: {"n", "normal", "abnormal", "patients"}} for every role and `val`, plus
    `unlabeled_abnormal_fraction` (the realised abnormal fraction of A)."""
    out: dict = {}
    for role in ROLES + ("val",):
        recs = getattr(split, role)
        out[role] = {
            "n": len(recs),
            "normal": sum(r.label == NORMAL for r in recs),
            "abnormal": sum(r.label == ABNORMAL for r in recs),
            "patients": len({r.patient_id for r in recs if r.patient_id}),
        }
    a = out["unlabeled"]
    out["unlabeled_abnormal_fraction"] = a["abnormal"] / a["n"] if a["n"] else 0.0
    return out


# ------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------
def write_split_manifest(split: HealthyGANSplit, csv_path) -> Path:
    """One row per record: path,label,role,patient_id,split,index,mask_file (paths written as stored)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MANIFEST_COLUMNS)
        for role in ROLES:
            for r in getattr(split, role):
                w.writerow([r.path, r.label, role, r.patient_id or "", r.split or "",
                            "" if r.index is None else r.index, r.mask_path or ""])
    return csv_path


def read_split_manifest(csv_path) -> HealthyGANSplit:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ScanomalyError(f"{csv_path}: no such split manifest")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("path", "label", "role") if c not in (reader.fieldnames or [])]
        if missing:
            raise ScanomalyError(f"{csv_path}: not a split manifest (missing column(s) {missing})")
        split = HealthyGANSplit()
        for i, row in enumerate(reader, start=2):
            role = row["role"].strip()
            if role not in ROLES:
                raise ScanomalyError(f"{csv_path}:{i}: unknown role {role!r} (expected one of {ROLES})")
            try:
                label = int(row["label"])
                index = int(row["index"]) if (row.get("index") or "").strip() else None
            except ValueError:
                raise ScanomalyError(f"{csv_path}:{i}: label and index must be integers") from None
            getattr(split, role).append(
                ImageRecord(
                    path=row["path"],
                    label=label,
                    split=(row.get("split") or None),
                    patient_id=(row.get("patient_id") or None),
                    index=index,
                    mask_path=(row.get("mask_file") or None),
                )
            )
    return split
