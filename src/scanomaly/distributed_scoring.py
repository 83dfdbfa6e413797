"""Scoring on several processes and machines (torchrun): one shard of the input per rank, one CSV at the end.

    torchrun --nproc_per_node=4 -m scanomaly score RUN archive/ --out scores.csv
    torchrun --nnodes=8 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
             -m scanomaly score RUN /shared/archive --out /shared/scores.csv

1. Every rank discovers the same input list and sorts it the same way (by volume group, then path and
   index; a group is a DICOM series or a file, so that a volume is never split between ranks).
2. Rank r takes the r-th of `size` contiguous shards (equal numbers of records, cut between groups) and
   scores it with `streaming.score_stream` into its own part, `<stem>.part-<r>-of-<size>.csv`, which a
   rerun resumes exactly as a one-process run resumes its CSV.
3. Rank 0 waits for every rank, then merges the parts into `--out` in the input's order (the order a
   one-process run writes: records as given, the images of a multi-image file by index), and writes the
   per-volume scores when volume maps were asked for. The parts are kept: they are what a rerun resumes.

Heatmap panels are named by the image's place in the whole input, so that they have the names a
one-process run gives them. They share one colour scale only when it is given: with --heatmaps, give
--heatmap-range (each rank would otherwise choose its own from its first batch).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from . import distributed, runs
from .data import ImageRecord
from .errors import ScanomalyError
from .scores_csv import record_key
from .streaming import StreamSummary, heatmap_scale_path, score_stream


def part_path(out_csv: Path, rank: int, size: int) -> Path:
    return out_csv.with_name(f"{out_csv.stem}.part-{rank:04d}-of-{size:04d}.csv")


def _parts_on_disk(out_csv: Path) -> list[Path]:
    pattern = re.compile(re.escape(out_csv.stem) + r"\.part-\d{4}-of-(\d{4})\.csv$")
    return sorted(p for p in out_csv.parent.glob(out_csv.stem + ".part-*.csv") if pattern.match(p.name))


def shard_bounds(groups: list[str], size: int) -> list[tuple[int, int]]:
    """`size` contiguous (start, stop) ranges over `groups` (sorted, equal values together) of about equal
    length, each cut where the group changes."""
    n = len(groups)
    starts = [0]
    for r in range(1, size):
        cut = max(starts[-1], round(r * n / size))
        while 0 < cut < n and groups[cut] == groups[cut - 1]:
            cut += 1
        starts.append(min(cut, n))
    return list(zip(starts, starts[1:] + [n]))


def shard_positions(records: list[ImageRecord], rank: int, size: int, group_of=None) -> list[int]:
    """Where this rank's records lie in `records`: the `rank`-th contiguous shard of the sorted list (see the
    module docstring)."""
    group_of = group_of or (lambda rec: rec.path)

    def order(i: int):
        r = records[i]
        return group_of(r), record_key(r.path, r.index)[0], -1 if r.index is None else r.index

    ordered = sorted(range(len(records)), key=order)
    start, stop = shard_bounds([group_of(records[i]) for i in ordered], size)[rank]
    return ordered[start:stop]


def shard(records: list[ImageRecord], rank: int, size: int, group_of=None) -> list[ImageRecord]:
    """This rank's records (`shard_positions`)."""
    return [records[i] for i in shard_positions(records, rank, size, group_of)]


def merge_parts(parts: list[Path], records: list[ImageRecord], out_csv: Path) -> int:
    """Write the rows of `parts` into `out_csv` in the order of `records`, the images of a multi-image file
    by index: the order a one-process run writes. Returns the number of rows."""
    position: dict[tuple, int] = {}
    for i, rec in enumerate(records):
        position.setdefault(record_key(rec.path, rec.index), i)
    header, rows = None, []
    for part in parts:
        with open(part, newline="") as fh:
            reader = csv.reader(fh)
            this_header = next(reader, None)
            if this_header is None:
                continue
            if header is not None and this_header != header:
                raise ScanomalyError(f"{part}: columns {this_header} differ from the other parts' {header}")
            header = this_header
            for row in reader:
                index = int(row[1]) if row[1] else None
                key = record_key(row[0], index)
                file_key = record_key(row[0], None)
                pos = position.get(key, position.get(file_key))
                if pos is None:
                    raise ScanomalyError(f"{part}: {row[0]} is not among the images of this run")
                rows.append(((pos, -1 if index is None else index), row))
    rows.sort(key=lambda t: t[0])
    partial = out_csv.with_name(out_csv.name + ".partial")
    with open(partial, "w", newline="") as fh:
        w = csv.writer(fh)
        if header is not None:
            w.writerow(header)
        w.writerows(row for _, row in rows)
    os.replace(partial, out_csv)
    return len(rows)


def score_sharded(scorer, records: list[ImageRecord], out_csv, *, batch_size: int = 64, workers: int = 2,
                  heatmap_dir=None, heatmap_range=None, overwrite: bool = False, progress: bool = True,
                  volumes=None) -> StreamSummary:
    """Score this rank's shard of `records` into its part; on rank 0, merge the parts into `out_csv`.
    Every rank returns the summary of the whole run (the sum over ranks)."""
    import torch.distributed as dist

    world = distributed.world()
    out_csv = Path(out_csv)
    if heatmap_dir is not None and heatmap_range is None:
        raise ScanomalyError("--heatmaps under torchrun needs --heatmap-range VMIN VMAX, so that every rank "
                             "draws with the same colour scale")
    mine = part_path(out_csv, world.rank, world.size)
    others = [p for p in _parts_on_disk(out_csv) if not p.name.endswith(f"-of-{world.size:04d}.csv")]
    if others and not overwrite:
        raise ScanomalyError(f"{others[0]} is a part of an earlier run on another number of processes; rerun "
                             f"with that number to resume it, or give --overwrite")
    distributed.barrier()  # every rank has looked before rank 0 removes anything
    if overwrite:  # here, not in score_stream: there a rank could remove the panels another has just written
        for stale in (mine, heatmap_scale_path(mine), runs.scores_source_path(mine)):
            stale.unlink(missing_ok=True)
        if world.is_main:
            for stale in others + [out_csv]:
                stale.unlink(missing_ok=True)
            runs.drop_heatmap_panels(heatmap_dir)
        distributed.barrier()

    group_of = volumes.group_of if volumes is not None else None
    my_positions = shard_positions(records, world.rank, world.size, group_of)
    my_records = [records[i] for i in my_positions]
    if volumes is not None:
        volumes.restrict(my_records)
    summary = StreamSummary(mine, 0, 0)
    error = None
    if my_records:
        try:
            summary = score_stream(
                scorer, my_records, mine, batch_size=batch_size, workers=workers, heatmap_dir=heatmap_dir,
                heatmap_range=heatmap_range, progress=progress and world.is_main,
                on_scored=volumes.add if volumes is not None else None, positions=my_positions)
            if volumes is not None:
                volumes.finish(mine, batch_size=batch_size, write_scores=False)
        except ScanomalyError as exc:
            if "no readable images" not in str(exc):
                error = str(exc)  # raised on every rank below, so that none waits for it
            summary.skipped = [{"path": my_records[0].path, "reason": f"this rank's whole shard is unreadable: {exc}"}]
    elif not mine.exists():
        mine.touch()

    gathered = [None] * world.size
    dist.all_gather_object(gathered, {"error": error, "n_scored": summary.n_scored, "n_already": summary.n_already_scored,
                                      "skipped": summary.skipped, "seconds": summary.seconds})
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise ScanomalyError(errors[0])
    total = StreamSummary(out_csv, sum(g["n_scored"] for g in gathered), sum(g["n_already"] for g in gathered),
                          [s for g in gathered for s in g["skipped"]], max(g["seconds"] for g in gathered),
                          heatmap_range)
    if total.n_scored + total.n_already_scored == 0:
        raise ScanomalyError(f"no readable images among {len(records)} record(s)")
    if world.is_main:
        parts = [part_path(out_csv, r, world.size) for r in range(world.size)]
        merge_parts([p for p in parts if p.is_file()], records, out_csv)
        if volumes is not None:
            volumes.write_scores(out_csv)
    distributed.barrier()  # the merged CSV is complete before any rank returns
    return total
