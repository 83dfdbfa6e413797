"""Streaming scoring: the CSV equals in-memory scoring, an interrupted run resumes without scoring
anything twice, unreadable files are skipped and listed, and the scorer only ever sees one batch."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from scanomaly import discover, get_method, load_images
from scanomaly.cli import main, read_scores_csv, write_scores_csv
from scanomaly.errors import ScanomalyError
from scanomaly.streaming import (
    HEATMAP_PERCENTILE,
    SCORE_COLUMNS,
    expand_records,
    heatmap_scale_path,
    score_stream,
)

from conftest import make_tiny_tree


class Killed(Exception):
    """Stands for the process dying mid-run."""


class Instrumented:
    """A Detector seen through its scoring calls: the size of every batch it gets, and optionally a
    crash at the start of batch number `die_at` (1-based)."""

    def __init__(self, detector, die_at: int | None = None):
        self.detector, self.die_at = detector, die_at
        self.preprocessing, self.name = detector.preprocessing, detector.name
        self.batch_sizes: list[int] = []

    def _seen(self, x):
        if self.die_at is not None and len(self.batch_sizes) + 1 == self.die_at:
            raise Killed
        self.batch_sizes.append(len(x))

    def score(self, x, batch_size=64):
        self._seen(x)
        return self.detector.score(x, batch_size)

    def score_and_reconstruct(self, x, batch_size=64):
        self._seen(x)
        return self.detector.score_and_reconstruct(x, batch_size)


@pytest.fixture(scope="module")
def detector():
    # untrained weights are enough: this is about the plumbing; eval mode scores each image on its own
    return get_method("ganomaly").from_profile("tiny")


@pytest.fixture
def tree(tmp_path):
    """24 synthetic 32 px images ({train,test}/{normal,abnormal}, 6 each) and one unreadable file."""
    root = make_tiny_tree(tmp_path / "tree")
    (root / "test" / "normal" / "zz_broken.png").write_bytes(b"not a png")
    return root


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def keys_of(rows):
    return [(r["path"], r["index"]) for r in rows]


@pytest.mark.parametrize("workers", [0, 2])
def test_csv_equals_in_memory_scoring(detector, tree, tmp_path, workers):
    records = discover(tree)
    images = load_images(records, detector.preprocessing, progress=False)
    scores, _ = detector.score(images, batch_size=5)
    reference = write_scores_csv(tmp_path / "in_memory.csv", images.records, scores)

    summary = score_stream(detector, records, tmp_path / "streamed.csv", batch_size=5, workers=workers, progress=False)
    assert summary.n_scored == 24 and summary.n_already_scored == 0
    streamed = rows_of(tmp_path / "streamed.csv")
    assert list(streamed[0]) == list(SCORE_COLUMNS)
    expected = rows_of(reference)
    assert keys_of(streamed) == keys_of(expected)
    assert [(r["name"], r["label"], r["patient_id"]) for r in streamed] == [(r["name"], r["label"], r["patient_id"]) for r in expected]
    np.testing.assert_allclose([float(r["score"]) for r in streamed], scores, rtol=1e-6, atol=0)
    assert len(read_scores_csv(tmp_path / "streamed.csv")) == 24  # what `scanomaly evaluate` reads


def test_unreadable_file_is_skipped_and_listed(detector, tree, tmp_path):
    summary = score_stream(detector, discover(tree), tmp_path / "s.csv", batch_size=4, workers=0, progress=False)
    assert [s["path"].endswith("zz_broken.png") for s in summary.skipped] == [True]
    assert "cannot decode" in summary.skipped[0]["reason"]
    assert not any("zz_broken" in r["path"] for r in rows_of(tmp_path / "s.csv"))


def test_nothing_readable_is_an_error(detector, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"junk")
    with pytest.raises(ScanomalyError, match="no readable images"):
        score_stream(detector, discover(tmp_path / "bad"), tmp_path / "s.csv", workers=0, progress=False)


def test_scorer_sees_one_batch_at_a_time(detector, tree, tmp_path):
    scorer = Instrumented(detector)
    score_stream(scorer, discover(tree), tmp_path / "s.csv", batch_size=4, workers=2, progress=False)
    # 25 records, one unreadable: batches of at most 4, every readable image once
    assert max(scorer.batch_sizes) <= 4 and sum(scorer.batch_sizes) == 24 and len(scorer.batch_sizes) == 7


def test_interrupted_run_resumes_and_scores_each_image_once(detector, tree, tmp_path):
    records, out = discover(tree), tmp_path / "s.csv"
    clean = score_stream(detector, records, tmp_path / "clean.csv", batch_size=4, workers=0, progress=False)
    assert clean.n_scored == 24

    first = Instrumented(detector, die_at=4)  # dies at the start of the 4th batch
    with pytest.raises(Killed):
        score_stream(first, records, out, batch_size=4, workers=0, progress=False)
    assert sum(first.batch_sizes) == len(rows_of(out)) == 12  # 3 batches, all written
    # a kill in the middle of a write leaves half a row: it is dropped and that image scored again
    with open(out, "a") as fh:
        fh.write(str(tree / "test" / "normal" / "normal_05.png")[:20])

    second = Instrumented(detector)
    summary = score_stream(second, records, out, batch_size=4, workers=0, progress=False)
    assert sum(second.batch_sizes) == summary.n_scored == 12 and summary.n_already_scored == 12
    final, expected = rows_of(out), rows_of(tmp_path / "clean.csv")
    assert sorted(keys_of(final)) == sorted(keys_of(expected)) and len(set(keys_of(final))) == 24
    by_key = {k: float(r["score"]) for k, r in zip(keys_of(expected), expected)}
    np.testing.assert_allclose([float(r["score"]) for r in final], [by_key[k] for k in keys_of(final)], rtol=1e-6)

    # a third run has nothing left to do; --overwrite starts over
    third = Instrumented(detector)
    assert score_stream(third, records, out, workers=0, progress=False).n_scored == 0 and third.batch_sizes == []
    assert score_stream(third, records, out, workers=0, overwrite=True, progress=False).n_scored == 24
    assert len(rows_of(out)) == 24


def test_heatmaps_are_written_per_batch_with_one_fixed_scale(detector, tree, tmp_path):
    records, out, maps_dir = discover(tree / "test"), tmp_path / "s.csv", tmp_path / "maps"
    scorer = Instrumented(detector, die_at=2)
    with pytest.raises(Killed):
        score_stream(scorer, records, out, batch_size=5, workers=0, heatmap_dir=maps_dir, progress=False)
    assert len(list(maps_dir.glob("*.png"))) == 5  # the first batch's panels, written before the kill

    images = load_images(records[:5], detector.preprocessing, progress=False)
    first_maps = detector.score(images)[1]
    expected_scale = [float(first_maps.min()), float(np.percentile(first_maps, HEATMAP_PERCENTILE))]
    saved = json.loads(heatmap_scale_path(out).read_text())["heatmap_range"]
    np.testing.assert_allclose(saved, expected_scale, rtol=1e-6)

    summary = score_stream(detector, records, out, batch_size=5, workers=0, heatmap_dir=maps_dir, progress=False)
    np.testing.assert_allclose(summary.heatmap_range, expected_scale, rtol=1e-6)  # the resumed run keeps it
    rows = rows_of(out)
    assert len(rows) == 12 and all((maps_dir / r["heatmap"].split("/")[-1]).is_file() for r in rows)
    assert len(list(maps_dir.glob("*.png"))) == 12

    # a scale given up front is the run's scale, and is kept for its resumption too
    given = score_stream(detector, records[:3], tmp_path / "given.csv", workers=0, heatmap_dir=tmp_path / "given",
                         heatmap_range=(0.0, 0.5), progress=False)
    assert given.heatmap_range == (0.0, 0.5)
    assert json.loads(heatmap_scale_path(tmp_path / "given.csv").read_text())["heatmap_range"] == [0.0, 0.5]

    # resuming into a CSV written without heatmaps would mix layouts
    with pytest.raises(ScanomalyError, match="--overwrite"):
        score_stream(detector, records, out, workers=0, progress=False)


def test_volume_slices_are_records_of_their_own(detector, tmp_path):
    volume = np.random.default_rng(0).random((40, 40, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    records = discover(tmp_path / "vol.nii.gz")
    assert [r.index for r in expand_records(records)] == [0, 1, 2, 3, 4]

    images = load_images(records, detector.preprocessing, progress=False)
    summary = score_stream(detector, records, tmp_path / "s.csv", batch_size=2, workers=0, progress=False)
    rows = rows_of(tmp_path / "s.csv")
    assert summary.n_scored == 5 and [r["index"] for r in rows] == ["0", "1", "2", "3", "4"]
    np.testing.assert_allclose([float(r["score"]) for r in rows], detector.score(images)[0], rtol=1e-6)


def test_cli_score_resumes_and_overwrites(detector, tree, tmp_path, capsys):
    detector.save(tmp_path / "model")
    argv = ["score", tmp_path / "model", tree / "test", "--out", tmp_path / "s.csv", "--workers", 0,
            "--batch-size", 4, "--no-progress", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert "scored 12 image(s) with ganomaly (torch" in out and "zz_broken.png" in err
    assert len(json.loads((tmp_path / "s_skipped.json").read_text())) == 1

    assert main([str(a) for a in argv]) == 0
    out, _ = capsys.readouterr()
    assert "scored 0 image(s)" in out and "12 scored before, not again" in out
    assert main([str(a) for a in argv + ["--overwrite"]]) == 0
    out, _ = capsys.readouterr()
    assert "scored 12 image(s)" in out and len(rows_of(tmp_path / "s.csv")) == 12
