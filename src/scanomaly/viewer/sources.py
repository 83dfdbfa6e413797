"""What the viewer shows: scores CSVs, each with the model that scored it when one can be found.

    scanomaly view scores.csv [--model RUN]   # one CSV
    scanomaly view runs/padim                 # a run folder: its test / validation scores, its model
    scanomaly view bench                      # a benchmark folder: every run's test scores

A source is one scores CSV (the columns `scanomaly score` writes, or a benchmark's test_scores.csv),
its rows in descending score order, and the model folder beside it (`<folder>/model`, `<folder>` itself,
or `--model`). Images are only ever read from the paths in the CSV; nothing a browser sends names a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ScanomalyError

SCORE_FILES = ("test_scores.csv", "scores.csv", "val_scores.csv")


@dataclass
class Source:
    id: int
    name: str
    csv: Path
    model_dir: Path | None
    rows: list[dict] = field(repr=False)  # read_scores_csv rows, sorted by descending score

    @cached_property
    def scores(self) -> np.ndarray:
        return np.asarray([r["score"] for r in self.rows], dtype=np.float64)

    @cached_property
    def labels(self) -> np.ndarray:
        """0 / 1, -1 where unknown."""
        return np.asarray([-1 if r["label"] is None else r["label"] for r in self.rows], dtype=np.int64)

    @property
    def has_labels(self) -> bool:
        return bool(((self.labels == 0).any()) and ((self.labels == 1).any()))


def model_dir_of(folder: Path) -> Path | None:
    from ..detector import MODEL_CONFIG

    for candidate in (folder / "model", folder):
        if (candidate / MODEL_CONFIG).is_file():
            return candidate
    return None


def _load_rows(csv_path: Path) -> list[dict]:
    from ..scores_csv import read_scores_csv

    rows = read_scores_csv(csv_path)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["score"], i))  # ties keep file order
    return [rows[i] for i in order]


def find_sources(target, model=None) -> list[Source]:
    """The scores CSVs of `target` (a CSV, or a run / benchmark folder searched for test_scores.csv,
    scores.csv and val_scores.csv), each with its model folder (`model` when given)."""
    target = Path(target).expanduser().resolve()
    if not target.exists():
        raise ScanomalyError(f"{target}: no such file or folder")
    model_dir = None
    if model is not None:
        model_dir = model_dir_of(Path(model).expanduser().resolve())
        if model_dir is None:
            raise ScanomalyError(f"{model}: no saved model there (model.json or model/model.json)")
    if target.is_file():
        if target.suffix.lower() != ".csv":
            raise ScanomalyError(f"{target}: expected a scores CSV, a run folder or a benchmark folder")
        csvs = [target]
    else:
        csvs = []
        for name in SCORE_FILES:
            csvs += sorted(target.rglob(name))
        csvs = sorted(set(csvs), key=lambda p: (SCORE_FILES.index(p.name), str(p)))
        if not csvs:
            raise ScanomalyError(f"{target}: no scores CSV found ({', '.join(SCORE_FILES)})")
    sources = []
    for i, path in enumerate(csvs):
        rows = _load_rows(path)
        name = str(path.relative_to(target)) if target.is_dir() else path.name
        sources.append(Source(i, name, path, model_dir or model_dir_of(path.parent), rows))
    return sources
