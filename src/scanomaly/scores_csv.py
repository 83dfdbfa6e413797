"""The scores CSV: every scoring path writes it (`score`, streaming, `train`'s validation scores, a
benchmark run's test scores) and `evaluate` and the report read it:
path,index,name,score,label,patient_id[,extra columns]; label 0/1, empty when unknown."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .data import LABEL_NAMES, UNKNOWN, UNKNOWN_LABEL_NAMES, ImageRecord
from .errors import ScanomalyError

SCORE_COLUMNS = ("path", "index", "name", "score", "label", "patient_id")


def record_key(path, index=None) -> tuple[str, int | None]:
    """What identifies an image across runs and files: its normalised absolute path, and its index."""
    return os.path.normcase(os.path.normpath(os.path.abspath(str(path)))), index


def score_row(rec: ImageRecord, score: float) -> list:
    """One CSV row (SCORE_COLUMNS) of an image's score; repr keeps every digit of the float."""
    return [rec.path, "" if rec.index is None else rec.index, rec.name, repr(float(score)),
            "" if rec.label == UNKNOWN else rec.label, rec.patient_id or ""]


def write_scores_csv(path, records: list[ImageRecord], scores, extra: dict[str, list] | None = None) -> Path:
    """All rows at once (in-memory scoring); `extra` adds columns, one list per column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(SCORE_COLUMNS) + list(extra))
        for i, (rec, s) in enumerate(zip(records, np.asarray(scores, dtype=np.float64).tolist())):
            w.writerow(score_row(rec, s) + [col[i] for col in extra.values()])
    return path


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
