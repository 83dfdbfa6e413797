"""Streaming batch scoring: a folder or manifest of any size, in memory that does not grow with it.

    summary = score_stream(detector, discover("scans/"), "scores.csv", batch_size=64, workers=2,
                           heatmap_dir="heatmaps/")

DataLoader workers read and preprocess one batch of images at a time (`RecordImages`, with the
model's own preprocessing); each batch is scored, its heatmap panels are written, and then its rows
are appended to the CSV and flushed. No image data accumulates: the loader holds the batches it
has prefetched (2 per worker), the scorer sees one batch at a time. (What does grow with the input:
the record list, the list of unreadable files and, when resuming, the set of images already done.)

Resuming: a CSV row is written only once the image is fully done, so the CSV says what is done.
Run again with the same `out_csv` and the images already in it (by path and index) are not scored
again; `overwrite=True` starts over. Unreadable files are skipped and listed in the summary, never
fatal; a resumed run tries them again.

Heatmap colours: every panel of a run uses one fixed scale, so that panels are comparable. It is
`heatmap_range` when given, else the first scored batch's minimum and 99.5th percentile (scoring
everything first to choose it would mean holding every map). It is saved beside the CSV
(`<stem>_heatmap_scale.json`), so a resumed run draws with the same scale.

The CSV has the columns of `scanomaly score` (path,index,name,score,label,patient_id[,heatmap]),
which `scanomaly evaluate` reads.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .data import UNKNOWN, ImageRecord, _cached_image, discover, label_text
from .errors import ImageReadError, ScanomalyError
from .io import RASTER_SUFFIXES, check_image_size, describe_file, read_image, suffix_of
from .preprocess import Preprocessing, to_unit_range
from . import runs
from .scores_csv import SCORE_COLUMNS, record_key, score_row

HEATMAP_COLUMN = "heatmap"
DEFAULT_WORKERS = 2
HEATMAP_PERCENTILE = 99.5  # the top of the colour scale: robust to a few extreme pixels


# ------------------------------------------------------------------------------------------
# reading: one image per record, in DataLoader workers
# ------------------------------------------------------------------------------------------
def expand_records(records: list[ImageRecord]) -> list[ImageRecord]:
    """One record per image: a file that holds several (a NIfTI volume, a multi-frame DICOM, an
    .npz without an index) becomes one record per image, as `load_images` numbers them. Then a
    batch is `batch_size` images, and a resumed run knows exactly which images are done.
    Only headers are read; a file whose header cannot be read stays one record (and is skipped,
    with its reason, when it is read)."""
    out = []
    for rec in records:
        n = 1
        if rec.index is None and suffix_of(rec.path) not in RASTER_SUFFIXES:  # rasters hold one image
            try:
                n = describe_file(rec.path)["n_images"]
            except ImageReadError:
                pass
        out.extend([rec] if n <= 1 else [replace(rec, index=k) for k in range(n)])
    return out


class RecordImages(Dataset):
    """Item i: (i, [C, S, S] tensors of record i, None) or (i, [], reason) when it is unreadable.
    A record normally gives one image (see `expand_records`); a multi-image file that was not
    expanded gives all of its images, as `load_images` does."""

    def __init__(self, records: list[ImageRecord], preprocessing: Preprocessing):
        self.records = records
        self.preprocessing = preprocessing
        # the last multi-image file read whole, per worker process: the slices of a volume are
        # consecutive records, so each batch decodes its volume once
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            arrays = read_image(rec.path) if rec.index is None else [_cached_image(self._cache, rec)]
            return i, [self.preprocessing.apply(check_image_size(rec.path, a)) for a in arrays], None
        except ScanomalyError as exc:
            return i, [], getattr(exc, "reason", str(exc))


@dataclass
class Batch:
    positions: list[int]  # of each image's file in the whole input: names heatmap files
    records: list[ImageRecord]  # one per image
    images: torch.Tensor | None  # [B, C, S, S] in [-1, 1]; None when nothing in the batch was readable
    skipped: list[dict]  # {"path", "reason"[, "index"]} as in ImageSet.skipped

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with pin_memory=True (scoring on a GPU)."""
        return replace(self, images=None if self.images is None else self.images.pin_memory())


class _Collate:
    """DataLoader collate_fn (a class, so that worker processes can receive it). `positions[i]`: where
    record i's file lies in the whole input."""

    def __init__(self, records: list[ImageRecord], positions: list[int]):
        self.records = records
        self.positions = positions

    def __call__(self, items) -> Batch:
        batch = Batch([], [], None, [])
        tensors = []
        for i, images, reason in items:
            rec = self.records[i]
            if reason is not None:
                batch.skipped.append({"path": rec.path, "reason": reason}
                                     | ({"index": rec.index} if rec.index is not None else {}))
                continue
            for k, t in enumerate(images):
                batch.positions.append(self.positions[i])
                batch.records.append(rec if len(images) == 1 else replace(rec, index=k))
                tensors.append(t)
        if tensors:
            batch.images = torch.stack(tensors)
        return batch


# ------------------------------------------------------------------------------------------
# the scores CSV: appended per batch, read back to resume
# ------------------------------------------------------------------------------------------
def _drop_partial_last_line(path: Path) -> None:
    """A run killed while writing can leave half a row; cut it, so that its image is scored again."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def scored_keys(path: Path, columns: list[str]) -> set[tuple[str, int | None]]:
    """The images an existing scores CSV already holds. Its header must be `columns`."""
    _drop_partial_last_line(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return set()
        if header != columns:
            raise ScanomalyError(f"{path} exists with columns {header}, this run writes {columns} "
                                 "(with and without heatmaps differ); use another --out, or --overwrite")
        keys = set()
        for line, row in enumerate(reader, start=2):
            try:
                keys.add(record_key(row[0], int(row[1]) if row[1] else None))
            except (IndexError, ValueError):
                raise ScanomalyError(f"{path}:{line}: not a row of a scores CSV; use another --out, or --overwrite") from None
    return keys


# ------------------------------------------------------------------------------------------
# heatmap panels
# ------------------------------------------------------------------------------------------
def heatmap_file_name(position: int, rec: ImageRecord) -> str:
    """`00042_person1_virus_6.png`, `00043_brain_12.png`: the position of the file in the whole input (and
    the image's index in a multi-image file) keep names unique and sorted as the input, whichever process
    of a sharded run (distributed_scoring.py) scores it."""
    name = Path(rec.path).name
    for suffix in (".nii.gz", Path(name).suffix):
        if suffix and name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if rec.index is not None:
        name += f"_{rec.index}"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return f"{position:05d}_{stem}.png"


def heatmap_scale_path(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.stem + "_heatmap_scale.json")


def saved_scale(out_csv: Path) -> tuple[float, float] | None:
    """The heatmap colour scale a scoring run into `out_csv` saved, or None."""
    path = heatmap_scale_path(out_csv)
    return tuple(json.loads(path.read_text())["heatmap_range"]) if path.is_file() else None


def _save_scale(path: Path, scale: tuple[float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"heatmap_range": list(scale)}) + "\n")


def _panel_title(rec: ImageRecord, score: float) -> str:
    return f"{rec.name}  score {score:.4g}" + (f"  ({label_text(rec.label)})" if rec.label != UNKNOWN else "")


def _write_panels(batch: Batch, scores, maps, healthy, heatmap_dir: Path, scale: tuple[float, float]) -> list[str]:
    from .viz import save_heatmap_panel

    paths = []
    for j, (pos, rec) in enumerate(zip(batch.positions, batch.records)):
        path = heatmap_dir / heatmap_file_name(pos, rec)
        save_heatmap_panel(path, to_unit_range(batch.images[j]), maps[j],
                           healthy=None if healthy is None else to_unit_range(torch.as_tensor(healthy[j])),
                           title=_panel_title(rec, float(scores[j])), vmin=scale[0], vmax=scale[1])
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
@dataclass
class StreamSummary:
    out_csv: Path
    n_scored: int  # images scored by this run
    n_already_scored: int  # images found in the CSV from an earlier run, not scored again
    skipped: list[dict] = field(default_factory=list)  # unreadable files, with their reasons
    seconds: float = 0.0
    heatmap_range: tuple[float, float] | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0


def score_stream(
    scorer,
    records: list[ImageRecord] | str | Path,
    out_csv,
    *,
    batch_size: int = 64,
    workers: int = DEFAULT_WORKERS,
    heatmap_dir=None,
    heatmap_range: tuple[float, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_scored=None,
    positions: list[int] | None = None,
) -> StreamSummary:
    """Score `records` batch by batch into `out_csv` (resuming it unless `overwrite`), with heatmap
    panels in `heatmap_dir` if given. `scorer` is a Detector or an `export.OnnxScorer`: anything
    with `preprocessing`, `score(x, batch_size)` and `score_and_reconstruct(x, batch_size)`.
    `on_scored(records, scores, maps, healthy, heatmap_range)`, with `heatmap_dir`, sees each batch's maps and
    the run's colour scale (volumes.VolumeOutputs).
    `positions`: where each record lies in the whole input (default: its place in `records`; a shard of a
    larger input gives its own), which names the heatmap panels."""
    if batch_size < 1 or workers < 0:
        raise ScanomalyError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    if not isinstance(records, list):
        records = discover(records)
    out_csv = Path(out_csv)
    heatmap_dir = None if heatmap_dir is None else Path(heatmap_dir)
    columns = list(SCORE_COLUMNS) + ([HEATMAP_COLUMN] if heatmap_dir is not None else [])
    scale_file = heatmap_scale_path(out_csv)
    if overwrite:
        for stale in (out_csv, scale_file, runs.scores_source_path(out_csv)):
            stale.unlink(missing_ok=True)
        runs.drop_heatmap_panels(heatmap_dir)

    positions = range(len(records)) if positions is None else positions
    expanded, origins = [], []
    for rec, position in zip(records, positions):
        images = expand_records([rec])
        expanded += images
        origins += [position] * len(images)
    records = expanded
    done = scored_keys(out_csv, columns) if out_csv.is_file() else set()
    runs.check_scores_source(out_csv, runs.scorer_source(scorer), resuming=bool(done))  # one model per CSV
    todo = [i for i, r in enumerate(records) if record_key(r.path, r.index) not in done]
    n_already = len(records) - len(todo)
    scale = heatmap_range
    if heatmap_dir is not None:
        if scale is None and done:  # resuming: the scale the run started with
            scale = saved_scale(out_csv)
        if scale is not None:
            _save_scale(scale_file, scale)

    # only the images still to do; RecordImages items carry their position in `records`
    loader = DataLoader(
        Subset(RecordImages(records, scorer.preprocessing), todo),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_Collate(records, origins),
        # page-locked batches: the copy to a GPU overlaps the next batch's reading
        pin_memory=getattr(getattr(scorer, "device", None), "type", "cpu") == "cuda",
    )
    summary = StreamSummary(out_csv, 0, n_already, heatmap_range=scale)
    start = time.perf_counter()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.is_file() or out_csv.stat().st_size == 0
    with open(out_csv, "a", newline="") as fh, tqdm(
        total=len(records), initial=n_already, unit="img", desc="scoring", disable=not progress, smoothing=0.1
    ) as bar:
        writer = csv.writer(fh)
        if new_file:
            writer.writerow(columns)
            fh.flush()
        for batch in loader:
            summary.skipped.extend(batch.skipped)
            if batch.images is not None:
                rows = _score_batch(scorer, batch, heatmap_dir, summary, scale_file, on_scored)
                writer.writerows(rows)
                fh.flush()  # the rows are the record of what is done: out of the process before the next batch
                summary.n_scored += len(rows)
            bar.update(len(batch.records) + len(batch.skipped))
    summary.seconds = time.perf_counter() - start
    if summary.n_scored + n_already == 0:
        s = summary.skipped
        detail = f"; {len(s)} unreadable, e.g. {s[0]['path']}: {s[0]['reason']}" if s else ""
        raise ScanomalyError(f"no readable images among {len(records)} record(s){detail}")
    return summary


def _score_batch(scorer, batch: Batch, heatmap_dir: Path | None, summary: StreamSummary, scale_file: Path,
                 on_scored=None) -> list[list]:
    x = batch.images
    if heatmap_dir is None:
        scores, _ = scorer.score(x, batch_size=len(x))
        return [score_row(rec, s) for rec, s in zip(batch.records, np.asarray(scores, dtype=np.float64))]
    scores, maps, healthy = scorer.score_and_reconstruct(x, batch_size=len(x))
    if summary.heatmap_range is None:  # the first batch sets the scale of the whole run
        maps = np.asarray(maps, dtype=np.float32)
        summary.heatmap_range = (float(maps.min()), float(np.percentile(maps, HEATMAP_PERCENTILE)))
        _save_scale(scale_file, summary.heatmap_range)
    panels = _write_panels(batch, scores, maps, healthy, heatmap_dir, summary.heatmap_range)
    if on_scored is not None:
        on_scored(batch.records, scores, maps, healthy, summary.heatmap_range)
    return [score_row(rec, s) + [p] for rec, s, p in zip(batch.records, np.asarray(scores, dtype=np.float64), panels)]
