"""The scores CSV every scoring path writes (`score`, streaming, `train`'s validation scores) and
`evaluate` reads: path,index,name,score,label,patient_id[,extra columns]; label 0/1, empty when unknown."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .data import UNKNOWN, ImageRecord

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
