"""Data sets: finding images on disk, and decoding them once into tensors kept in memory.

Layouts understood by `discover`:
- `root/{normal,abnormal}`                      labeled, no split
- `root/{train,test}/{normal,abnormal}`         labeled with an official split (anomalib's Folder convention)
- `root/{normal,abnormal,masks}`                labeled, with pixel masks named like the abnormal images
- a plain folder of images (searched recursively)  unlabeled
- a CSV manifest `path,label[,patient_id][,mask_file][,split][,index]` (paths relative to the CSV)
- a MedMNIST-style .npz: one record per image, with its split (train/val/test), index and label
- a single image file

A folder layout with a `manifest.csv` beside its class folders (as in ../shared/data) takes
`patient_id` and `mask_file` from it for the images it lists; the folders stay the source of labels.

Labels: 0 = normal, 1 = abnormal, -1 = unknown.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ImageReadError, ScanomalyError
from .io import check_image_size, is_image_file, npz_splits, read_image, suffix_of
from .preprocess import Preprocessing

NORMAL, ABNORMAL, UNKNOWN = 0, 1, -1
LABEL_NAMES = {"normal": NORMAL, "healthy": NORMAL, "0": NORMAL, "abnormal": ABNORMAL, "anomalous": ABNORMAL, "1": ABNORMAL}
UNKNOWN_LABEL_NAMES = {"", "-1", "unknown", "unlabeled", "unlabelled", "?"}


def label_text(label: int) -> str:
    """"normal", "abnormal" or "unknown" for a label 0 / 1 / -1."""
    return {NORMAL: "normal", ABNORMAL: "abnormal"}.get(label, "unknown")


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk (or one slice / row of a multi-image file)."""

    path: str
    label: int = UNKNOWN
    split: str | None = None  # "train" / "test" when the layout has an official split
    patient_id: str | None = None
    index: int | None = None  # slice of a volume or row of an .npz
    mask_path: str | None = None

    @property
    def name(self) -> str:
        base = Path(self.path).name
        return base if self.index is None else f"{base}#{self.index}"


@dataclass
class ImageSet:
    """Decoded, preprocessed images kept in memory: `images` is [N, C, S, S] float32 in [-1, 1]."""

    images: torch.Tensor
    records: list[ImageRecord]
    masks: torch.Tensor | None = None  # [N, S, S] bool when masks exist (all-False for normals)
    skipped: list[dict] = field(default_factory=list)  # [{"path":..., "reason":...}] for unreadable files

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def patient_ids(self) -> list[str | None]:
        return [r.patient_id for r in self.records]

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return ImageSet(
            images=self.images[idx],
            records=[self.records[i] for i in idx.tolist()],
            masks=None if self.masks is None else self.masks[idx],
            skipped=list(self.skipped),
        )


# ------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------
def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def _class_folders(root: Path, split: str | None) -> list[ImageRecord]:
    masks_dir = root / "masks"
    records = []
    for cls in ("normal", "abnormal"):
        for p in _images_under(root / cls):
            mask = masks_dir / p.name if cls == "abnormal" and (masks_dir / p.name).is_file() else None
            records.append(ImageRecord(str(p), LABEL_NAMES[cls], split, mask_path=str(mask) if mask else None))
    return records


def read_manifest(csv_path: Path) -> list[ImageRecord]:
    """CSV with a `path` (or `file`) column and optional `label`, `split`, `patient_id`, `mask_file`, `index`
    columns. Relative paths (images and masks) are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ScanomalyError(f"{csv_path}: cannot read the manifest ({exc})") from None
    if not rows:
        raise ScanomalyError(f"{csv_path}: the manifest has no rows")
    if "path" not in rows[0] and "file" not in rows[0]:
        raise ScanomalyError(f"{csv_path}: a manifest needs a 'path' column (found {list(rows[0])})")
    base = csv_path.parent
    records = []
    for i, row in enumerate(rows, start=2):
        raw = (row.get("path") or row.get("file") or "").strip()
        if not raw:
            raise ScanomalyError(f"{csv_path}:{i}: empty path")
        label_text = (row.get("label") or "").strip().lower()
        if label_text not in LABEL_NAMES and label_text not in UNKNOWN_LABEL_NAMES:
            raise ScanomalyError(f"{csv_path}:{i}: unknown label {label_text!r} (use normal/abnormal or 0/1)")
        mask = (row.get("mask_file") or "").strip()
        index = (row.get("index") or "").strip()
        try:
            index_value = int(index) if index else None
        except ValueError:
            raise ScanomalyError(f"{csv_path}:{i}: index must be an integer, got {index!r}") from None
        records.append(
            ImageRecord(
                path=str(base / raw),  # an absolute `raw` stays absolute
                label=LABEL_NAMES.get(label_text, UNKNOWN),
                split=(row.get("split") or "").strip() or None,
                patient_id=(row.get("patient_id") or "").strip() or None,
                index=index_value,
                mask_path=str(base / mask) if mask else None,
            )
        )
    return records


def npz_records(path) -> list[ImageRecord]:
    """One record per image of a MedMNIST-style .npz, indexed in train, val, test order.

    Labels: `{split}_labels` with values 0/1 (1 = abnormal, as in PneumoniaMNIST); files whose labels
    are not binary (multi-class MedMNIST sets) get unknown labels, with a warning.
    """
    path = Path(path)
    splits = npz_splits(path)
    with np.load(str(path), allow_pickle=False) as npz:
        parts = []
        for split in splits:
            n = int(npz[f"{split}_images"].shape[0])
            labels = np.asarray(npz[f"{split}_labels"]) if f"{split}_labels" in npz.files else None
            if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            parts.append((split, n, labels))
    binary = all(lab is not None and lab.ndim == 1 and len(lab) == n and set(np.unique(lab).tolist()) <= {0, 1}
                 for _, n, lab in parts)
    if not binary and any(lab is not None for _, _, lab in parts):
        warnings.warn(f"{path}: labels are not binary 0/1 (or missing for a split); records get unknown labels")
    records, offset = [], 0
    for split, n, labels in parts:
        for i in range(n):
            label = int(labels[i]) if binary else UNKNOWN
            records.append(ImageRecord(str(path), label, split, index=offset + i))
        offset += n
    return records


def _records_for_file(p: Path) -> list[ImageRecord]:
    return npz_records(p) if suffix_of(p) == ".npz" else [ImageRecord(str(p))]


def _folder_manifest_info(root: Path) -> dict[str, tuple[str | None, str | None]]:
    """normalised image path -> (patient_id, mask path) from `root/manifest.csv`, when it has such columns."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    try:
        with open(manifest, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if not ({"path", "file"} & set(cols)) or not ({"patient_id", "mask_file"} & set(cols)):
                return {}
            info = {}
            for row in reader:
                raw = (row.get("path") or row.get("file") or "").strip()
                if not raw:
                    continue
                pid = (row.get("patient_id") or "").strip() or None
                mask = (row.get("mask_file") or "").strip()
                info[os.path.normpath(str(root / raw))] = (pid, os.path.normpath(str(root / mask)) if mask else None)
            return info
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # the manifest is optional metadata; the folder layout still works without it


def _enrich(records: list[ImageRecord], root: Path) -> list[ImageRecord]:
    info = _folder_manifest_info(root)
    if not info:
        return records
    out = []
    for r in records:
        pid, mask = info.get(os.path.normpath(r.path), (None, None))
        use_mask = mask if (mask and not r.mask_path and r.label == ABNORMAL and Path(mask).is_file()) else None
        if (pid and not r.patient_id) or use_mask:
            r = replace(r, patient_id=r.patient_id or pid, mask_path=r.mask_path or use_mask)
        out.append(r)
    return out


def discover(source) -> list[ImageRecord]:
    """Find every image under `source` (folder layout, CSV manifest, .npz or single file)."""
    root = Path(source)
    if not root.exists():
        raise ScanomalyError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return read_manifest(root)
        if not is_image_file(root):
            raise ScanomalyError(f"{root}: not an image file or manifest (supported: images, DICOM, NIfTI, .npz, .csv)")
        return _records_for_file(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        records = _class_folders(root / "train", "train") + _class_folders(root / "test", "test")
    elif (root / "normal").is_dir() or (root / "abnormal").is_dir():
        records = _class_folders(root, None)
    else:
        records = [r for p in _images_under(root) for r in _records_for_file(p)]
    if not records:
        raise ScanomalyError(
            f"{root}: no images found (looked for {{normal,abnormal}}/, {{train,test}}/{{normal,abnormal}}/ "
            "or image files: PNG, JPEG, TIFF, BMP, DICOM, NIfTI, .npz)"
        )
    return _enrich(records, root)


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def load_images(
    records: list[ImageRecord] | str | Path,
    preprocessing: Preprocessing,
    progress: bool = True,
    desc: str = "decoding",
) -> ImageSet:
    """Decode and preprocess every record once. Unreadable files are skipped and listed in `.skipped`."""
    if not isinstance(records, list):
        records = discover(records)
    tensors, kept, masks, skipped = [], [], [], []
    any_mask = any(r.mask_path for r in records)
    cache: dict = {}  # the last multi-image file read whole, so N records of one .npz / volume decode it once
    for rec in tqdm(records, desc=desc, disable=not progress or len(records) < 200, leave=False):
        try:
            if rec.index is None:
                arrays = read_image(rec.path)
            else:
                arrays = [_cached_image(cache, rec)]
            for arr in arrays:
                check_image_size(rec.path, arr)  # too small to score: skipped with its reason
            rec_masks = [_load_mask(rec, arr.shape, preprocessing) for arr in arrays] if any_mask else None
        except ScanomalyError as exc:
            entry = {"path": rec.path, "reason": getattr(exc, "reason", str(exc))}
            if rec.index is not None:
                entry["index"] = rec.index
            skipped.append(entry)
            continue
        for k, arr in enumerate(arrays):
            tensors.append(preprocessing.apply(arr))
            # a multi-image file expands into one record per image
            kept.append(rec if len(arrays) == 1 else replace(rec, index=k))
            if any_mask:
                masks.append(rec_masks[k])
    if not tensors:
        detail = f"; {len(skipped)} unreadable, e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise ScanomalyError(f"no readable images among {len(records)} record(s){detail}")
    return ImageSet(
        images=torch.stack(tensors),
        records=kept,
        masks=torch.stack(masks) if any_mask else None,
        skipped=skipped,
    )


def _cached_image(cache: dict, rec: ImageRecord) -> np.ndarray:
    if cache.get("path") != rec.path:
        cache.clear()
        cache["path"] = rec.path
        try:
            cache["images"] = read_image(rec.path)
        except ImageReadError as exc:
            cache["error"] = exc
    if "error" in cache:
        raise cache["error"]
    images = cache["images"]
    if not 0 <= rec.index < len(images):
        raise ImageReadError(rec.path, f"index {rec.index} out of range (file holds {len(images)} images)")
    return images[rec.index]


def _load_mask(rec: ImageRecord, shape, preprocessing: Preprocessing) -> torch.Tensor:
    if rec.mask_path is None:
        return torch.zeros(preprocessing.image_size, preprocessing.image_size, dtype=torch.bool)
    try:
        mask = read_image(rec.mask_path)[0]
    except ImageReadError as exc:
        raise ImageReadError(rec.path, f"its mask {exc.path} is unreadable: {exc.reason}") from None
    if mask.shape != shape:
        raise ImageReadError(rec.path, f"mask {rec.mask_path} has shape {mask.shape}, the image {shape}")
    return preprocessing.apply_mask(mask > 0.5)
