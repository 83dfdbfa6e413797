"""Scoring under torchrun: each rank scores a contiguous shard of the sorted input (volumes whole), rank 0
merges the parts into one CSV that equals a one-process run row for row, and a rerun resumes every shard."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from scanomaly import discover, get_method
from scanomaly.cli import main
from scanomaly.data import ImageRecord
from scanomaly.distributed_scoring import merge_parts, part_path, shard, shard_bounds

from conftest import make_tiny_tree
from test_distributed import torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_shards_cover_the_sorted_input_once_and_never_split_a_group():
    groups = sorted(["a", "a", "a", "b", "c", "c", "c", "c", "d", "e"])
    for size in (1, 2, 3, 4, 7, 12):
        bounds = shard_bounds(groups, size)
        assert len(bounds) == size and bounds[0][0] == 0 and bounds[-1][1] == len(groups)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint
        for start, stop in bounds:
            if 0 < start < len(groups):
                assert groups[start] != groups[start - 1]  # a cut lies between groups
    records = [ImageRecord(f"/d/{name}.png") for name in "qwertyuiop"]
    parts = [shard(records, r, 3) for r in range(3)]
    assert [r.path for p in parts for r in p] == sorted(r.path for r in records)


def test_merge_puts_rows_in_input_order(tmp_path):
    records = [ImageRecord("/d/z.png"), ImageRecord("/d/vol.nii.gz"), ImageRecord("/d/a.png")]
    header = "path,index,name,score,label,patient_id\n"
    (tmp_path / "p0.csv").write_text(header + "/d/a.png,,a.png,0.1,,\n/d/vol.nii.gz,1,vol#1,0.3,,\n")
    (tmp_path / "p1.csv").write_text(header + "/d/vol.nii.gz,0,vol#0,0.2,,\n/d/z.png,,z.png,0.4,,\n")
    assert merge_parts([tmp_path / "p0.csv", tmp_path / "p1.csv"], records, tmp_path / "out.csv") == 4
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] + "\n" == header
    assert [line.split(",")[0] + ":" + line.split(",")[1] for line in lines[1:]] == [
        "/d/z.png:", "/d/vol.nii.gz:0", "/d/vol.nii.gz:1", "/d/a.png:"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dscore")
    tree = make_tiny_tree(root / "images", n=4)
    (tree / "test" / "normal" / "zz_broken.png").write_bytes(b"not a png")
    images = root / "flat"
    images.mkdir()
    for p in sorted(tree.rglob("*.png")):  # one flat folder: images, a volume, an unreadable file
        (images / f"{p.parent.parent.name}_{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    volume = np.random.default_rng(0).random((32, 32, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(images / "m_volume.nii.gz"))
    get_method("ganomaly").from_profile("tiny").save(root / "model")
    return root, images


def _score_args(root, images, out):
    return ["-m", "scanomaly", "score", root / "model", images, "--out", out, "--workers", 0, "--batch-size", 3,
            "--no-progress", "--device", "cpu"]


def test_two_processes_write_the_one_process_csv_and_a_rerun_resumes_every_shard(inputs, tmp_path):
    root, images = inputs
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main([str(a) for a in _score_args(root, images, one)[2:]]) == 0
    proc = torchrun(2, *_score_args(root, images, two))
    assert "scored 21 image(s)" in proc.stdout and "on 2 processes" in proc.stdout
    assert len(discover(images)) == 18  # 16 images, the volume, the unreadable file: 16 + 5 slices scored
    expected = one.read_text().splitlines()
    assert len(expected) == 22 and two.read_text().splitlines() == expected
    for rank in (0, 1):
        assert part_path(two, rank, 2).is_file()

    # a run killed part way: the merged CSV gone, each part missing its last rows
    two.unlink()
    cut = {}
    for rank in (0, 1):
        part = part_path(two, rank, 2)
        lines = part.read_text().splitlines(keepends=True)
        cut[rank] = 2 + rank
        part.write_text("".join(lines[: -cut[rank]]))
    proc = torchrun(2, *_score_args(root, images, two))
    assert f"scored {sum(cut.values())} image(s)" in proc.stdout
    assert f"({21 - sum(cut.values())} scored before, not again)" in proc.stdout
    assert two.read_text().splitlines() == expected


def test_a_rerun_on_another_number_of_processes_is_refused(inputs, tmp_path):
    root, images = inputs
    out = tmp_path / "s.csv"
    part_path(out, 0, 3).write_text("path,index,name,score,label,patient_id\n")
    proc = torchrun(2, *_score_args(root, images, out), check=False)
    assert proc.returncode != 0 and "another number of processes" in proc.stderr


def test_volume_maps_under_torchrun_need_one_colour_scale_and_are_written_once(inputs, tmp_path):
    root, images = inputs
    out, heat = tmp_path / "s.csv", tmp_path / "heat"
    proc = torchrun(2, *_score_args(root, images, out), "--heatmaps", heat, check=False)
    assert proc.returncode != 0 and "--heatmap-range" in proc.stderr
    proc = torchrun(2, *_score_args(root, images, out), "--heatmaps", heat, "--heatmap-range", 0, 1)
    assert "1 volume map(s)" in proc.stdout
    maps = sorted(p.name for p in (heat / "volumes").iterdir())
    assert maps == ["0000_m_volume_anomaly_map.nii.gz", "0000_m_volume_healthy.nii.gz"]
    assert nib.load(str(heat / "volumes" / maps[0])).shape == (32, 32, 5)
    rows = (tmp_path / "s_volumes.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[2] == "5"
    assert len(list(heat.glob("*.png"))) == 21  # one panel per image, none overwritten by another rank

    # the panels have the names a one-process run gives them, and the merged CSV names them as it does
    one_heat = tmp_path / "one_heat"
    argv = _score_args(root, images, tmp_path / "one.csv")[2:] + ["--heatmaps", one_heat, "--heatmap-range", 0, 1]
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in heat.glob("*.png")) == sorted(p.name for p in one_heat.glob("*.png"))

    def rows(path):
        lines = path.read_text().splitlines()
        return [line.rsplit(",", 1)[0] + "," + line.rsplit("/", 1)[-1] for line in lines[1:]]

    assert rows(out) == rows(tmp_path / "one.csv")
