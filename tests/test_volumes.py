"""Heatmap volumes: maps come back on the input's own grid (shape, affine, orientation), the hot voxel lands
on the lesion, translations come back in the scan's units, DICOM series give a Parametric Map that references
the source images, and per-volume scores follow the `evaluate --per-patient` rules."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from scanomaly import get_method
from scanomaly.cli import main
from scanomaly.data import discover
from scanomaly.io import read_image
from scanomaly.metrics import patient_scores
from scanomaly.preprocess import Preprocessing
from scanomaly.streaming import score_stream
from scanomaly.volumes import (
    TOP_K,
    VolumeOutputs,
    find_volumes,
    slice_to_grid,
    volume_scores_path,
)


class BrightnessScorer:
    """A scorer whose anomaly map is the image's brightness and whose healthy translation is the image itself:
    whatever the map shows is where the input is bright, so the geometry of the outputs can be checked exactly."""

    name = "brightness"

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def score(self, x, batch_size=64):
        maps = ((x + 1) / 2).mean(dim=1).numpy()
        return maps.reshape(len(maps), -1).max(axis=1).astype(np.float64), maps

    def score_and_reconstruct(self, x, batch_size=64):
        scores, maps = self.score(x, batch_size)
        return scores, maps, x.numpy().copy()


def _rotation_x(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def oblique_flipped_affine() -> np.ndarray:
    """Stored axis 0 points superior (3 mm), axis 1 to the patient's left (a flipped R axis, 1.5 mm), axis 2
    anterior (1.2 mm); all turned 15 degrees about x and shifted."""
    directions = _rotation_x(15) @ np.column_stack([[0, 0, 3.0], [-1.5, 0, 0], [0, 1.2, 0]])
    affine = np.eye(4)
    affine[:3, :3] = directions
    affine[:3, 3] = [40.0, -25.0, 12.0]
    return affine


def lesion_volume(shape=(7, 20, 20), lesion=(4, 6, 13), low=100.0, high=1100.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = low + 200.0 * rng.random(shape)
    data[lesion] = high
    return data.astype(np.float32)


def _score_with_volumes(scorer, records, out_csv, heatmap_dir, batch_size=4, dicom_output="parametric-map",
                        heatmap_range=None):
    volumes = VolumeOutputs(scorer, records, heatmap_dir, dicom_output=dicom_output)
    score_stream(scorer, records, out_csv, batch_size=batch_size, workers=0, heatmap_dir=heatmap_dir,
                 heatmap_range=heatmap_range, progress=False, on_scored=volumes.add)
    return volumes, volumes.finish(out_csv)


def test_slice_to_grid_places_the_map_in_the_crop_box():
    prep = Preprocessing(image_size=8, top_crop=0.25, center_crop=True)
    # a 24 x 16 slice: 6 rows cut at the top, then the central 16 x 16 square of the 18 x 16 left: rows 7..22
    assert prep.crop_box(24, 16) == (7, 0, 23, 16)
    values = np.arange(64, dtype=np.float32).reshape(8, 8)
    out = slice_to_grid(values, prep, (24, 16), -1.0)
    assert out.shape == (24, 16)
    assert (out[:7] == -1).all() and (out[23:] == -1).all()
    inside = out[7:23]
    assert inside.min() >= 0 and inside.max() <= 63
    # the corner value lands in the matching corner
    assert inside[0, 0] < inside[0, -1] < inside[-1, -1]


@pytest.mark.parametrize("image_size", [20, 10])
def test_oblique_flipped_nifti_comes_back_on_its_grid_with_the_hot_voxel_on_the_lesion(tmp_path, image_size):
    affine = oblique_flipped_affine()
    lesion = (4, 6, 13)
    data = lesion_volume(lesion=lesion)
    if image_size == 10:  # a model at half resolution: the lesion is a 2 x 2 blob, found to within a voxel
        data[4, 6:8, 12:14] = 1100.0
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    assert nib.aff2axcodes(affine) == ("S", "L", "A")

    scorer = BrightnessScorer(Preprocessing(image_size=image_size))
    records = discover(path)
    volumes, volume_csv = _score_with_volumes(scorer, records, tmp_path / "scores.csv", tmp_path / "heat")

    map_path, healthy_path = volumes.volumes[0].outputs
    anomaly = nib.load(map_path)
    assert anomaly.shape == data.shape
    np.testing.assert_allclose(anomaly.affine, affine, atol=1e-6)
    assert nib.aff2axcodes(anomaly.affine) == ("S", "L", "A")
    hot = np.unravel_index(np.argmax(np.asarray(anomaly.dataobj)), data.shape)
    if image_size == 20:
        assert hot == lesion
    else:
        assert hot[0] == 4 and abs(hot[1] - 6.5) <= 1 and abs(hot[2] - 12.5) <= 1

    healthy = np.asarray(nib.load(healthy_path).dataobj)
    assert healthy.shape == data.shape
    if image_size == 20:  # identity translation, no resize: the scan itself, in its own units
        np.testing.assert_allclose(healthy, data, rtol=1e-5, atol=1e-2)

    # one row per volume, the evaluate --per-patient reductions of its slice scores
    with open(volume_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "scores.csv", newline="") as fh:
        slice_scores = [float(r["score"]) for r in csv.DictReader(fh)]
    assert len(rows) == 1 and int(rows[0]["n_slices"]) == len(slice_scores) == data.shape[0]
    for column, rule in (("mean", "mean"), ("max", "max"), (f"top{TOP_K}_mean", "topk_mean")):
        expected = patient_scores(slice_scores, ["v"] * len(slice_scores), [-1] * len(slice_scores), reduce=rule, k=TOP_K)[0][0]
        assert float(rows[0][column]) == pytest.approx(expected)


def test_a_resumed_run_rescores_a_partly_scored_volume_and_reuses_finished_ones(tmp_path):
    data = lesion_volume()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, oblique_flipped_affine()), str(tmp_path / f"{name}.nii.gz"))
    scorer = BrightnessScorer(Preprocessing(image_size=20))
    records = discover(tmp_path)
    volumes, _ = _score_with_volumes(scorer, records, tmp_path / "full.csv", tmp_path / "full")
    reference = [np.asarray(nib.load(v.outputs[0]).dataobj) for v in volumes.volumes]

    # a run that died after 3 slices of volume a: the CSV holds them, no map was written
    with open(tmp_path / "full.csv") as fh:
        lines = fh.readlines()
    (tmp_path / "part.csv").write_text("".join(lines[:4]))
    volumes, _ = _score_with_volumes(scorer, records, tmp_path / "part.csv", tmp_path / "part")
    for vol, ref in zip(volumes.volumes, reference):
        np.testing.assert_array_equal(np.asarray(nib.load(vol.outputs[0]).dataobj), ref)

    # run again: nothing to score, the written volumes are kept, not redone
    stamps = [mtime(v.outputs[0]) for v in volumes.volumes]
    volumes, volume_csv = _score_with_volumes(scorer, records, tmp_path / "part.csv", tmp_path / "part")
    assert [mtime(v.outputs[0]) for v in volumes.volumes] == stamps
    with open(volume_csv, newline="") as fh:
        assert [r["anomaly_map"] for r in csv.DictReader(fh)] == [v.outputs[0] for v in volumes.volumes]


def mtime(path) -> int:
    import os

    return os.stat(path).st_mtime_ns


def test_cli_score_writes_volume_maps_with_a_real_detector(tmp_path, capsys):
    detector = get_method("ganomaly").from_profile("tiny")
    detector.save(tmp_path / "model")
    data = lesion_volume(shape=(5, 24, 18))
    nib.save(nib.Nifti1Image(data, oblique_flipped_affine()), str(tmp_path / "scan.nii.gz"))
    argv = ["score", tmp_path / "model", tmp_path / "scan.nii.gz", "--out", tmp_path / "s.csv", "--heatmaps",
            tmp_path / "heat", "--workers", 0, "--batch-size", 2, "--no-progress", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "1 volume map(s)" in out
    maps = sorted((tmp_path / "heat" / "volumes").glob("*.nii.gz"))
    assert [p.name for p in maps] == ["0000_scan_anomaly_map.nii.gz", "0000_scan_healthy.nii.gz"]
    for p in maps:
        img = nib.load(str(p))
        assert img.shape == data.shape and np.allclose(img.affine, oblique_flipped_affine())
        assert np.isfinite(np.asarray(img.dataobj)).all()
    # the slice maps are the detector's: a slice's map, taken back to the model's grid, is what score gives
    images = torch.stack([detector.preprocessing.apply(a) for a in read_image(tmp_path / "scan.nii.gz")])
    _, slice_maps = detector.score(images)
    canonical = nib.as_closest_canonical(nib.load(str(maps[0])))
    view = np.asarray(canonical.dataobj)[::-1, ::-1, 2].T
    t, l, b, r = detector.preprocessing.crop_box(*view.shape)
    np.testing.assert_allclose(view[t:b, l:r].mean(), slice_maps[2].mean(), rtol=0.05)
    assert volume_scores_path(tmp_path / "s.csv").is_file()


# ------------------------------------------------------------------------------------------
# DICOM series -> Parametric Map
# ------------------------------------------------------------------------------------------
def write_mr_series(folder, n=5, rows=32, cols=32, lesion=(3, 10, 21), seed=0):
    """A synthetic MR series of single-frame files, written in shuffled name order (slices sorted by position)."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = rng.permutation(n)
    files = []
    for k in range(n):
        pixels = (200 + 100 * rng.random((rows, cols))).astype(np.uint16)
        if k == lesion[0]:
            pixels[lesion[1], lesion[2]] = 2000
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Volume", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "MR", 3, k + 1, "synthetic"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -20.0, 2.5 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"IM{order[k]:04d}"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files, series


def test_dicom_series_gives_a_parametric_map_that_references_it_and_round_trips(tmp_path):
    pytest.importorskip("highdicom")
    import pydicom

    files, series_uid = write_mr_series(tmp_path / "series")
    scorer = BrightnessScorer(Preprocessing(image_size=32))
    records = discover(tmp_path / "series")
    assert [v.kind for v in find_volumes(records)] == ["dicom"]
    volumes, volume_csv = _score_with_volumes(scorer, records, tmp_path / "scores.csv", tmp_path / "heat")
    pm = pydicom.dcmread(volumes.volumes[0].outputs[0])

    sources = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    from pydicom.uid import ParametricMapStorage

    assert pm.SOPClassUID == ParametricMapStorage and pm.NumberOfFrames == len(files)
    referenced = pm.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series_uid
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} == set(sources)
    assert pm.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID

    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
    values = pm.pixel_array.astype(np.float64) * slope + intercept
    by_z = {float(pydicom.dcmread(f).ImagePositionPatient[2]): f for f in files}
    lesion_frame = None
    for i, group in enumerate(pm.PerFrameFunctionalGroupsSequence):
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        expected = read_image(by_z[z])[0]  # the brightness map of that slice, as the model saw it
        np.testing.assert_allclose(values[i], expected, atol=slope / 2 + 1e-9)
        if z == 2.5 * 3:
            lesion_frame = values[i]
    # (each DICOM file is scaled to [0, 1] on its own: the lesion is the hot pixel of its own slice)
    assert np.unravel_index(np.argmax(lesion_frame), lesion_frame.shape) == (10, 21)
    with open(volume_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["kind"] == "dicom" and rows[0]["volume"] == series_uid


# ------------------------------------------------------------------------------------------
# DICOM series -> Secondary Capture overlay
# ------------------------------------------------------------------------------------------
def test_dicom_series_gives_a_secondary_capture_overlay_in_slice_order_with_the_lesion_hot(tmp_path):
    pytest.importorskip("highdicom")
    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage

    files, series_uid = write_mr_series(tmp_path / "series")  # files[k]: the slice at z = 2.5 k; lesion (3, 10, 21)
    sources = [pydicom.dcmread(f) for f in files]
    scorer = BrightnessScorer(Preprocessing(image_size=32))
    records = discover(tmp_path / "series")
    # the run's colour scale tops at the lesion (the map is the brightness the reader gives: stored / 65535);
    # the background, at most 300 / 65535, stays grey-blue
    scale = (0.0, 2000 / 65535)
    volumes, volume_csv = _score_with_volumes(scorer, records, tmp_path / "scores.csv", tmp_path / "heat",
                                              dicom_output="both", heatmap_range=scale)
    vol = volumes.volumes[0]
    assert vol.outputs[0].endswith("_anomaly_map.dcm") and pydicom.dcmread(vol.outputs[0]).NumberOfFrames == 5
    overlay = sorted((tmp_path / "heat" / "volumes").glob("*_overlay/*.dcm"))
    assert len(overlay) == len(files) and str(overlay[0].parent) == vol.overlay

    images = [pydicom.dcmread(p) for p in overlay]
    assert len({str(im.SeriesInstanceUID) for im in images}) == 1 and images[0].SeriesInstanceUID != series_uid
    redness = []
    for k, (image, source) in enumerate(zip(images, sources)):
        assert image.SOPClassUID == SecondaryCaptureImageStorage and image.InstanceNumber == k + 1
        assert image.StudyInstanceUID == source.StudyInstanceUID and image.PatientID == source.PatientID
        assert image.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID  # slice order
        assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
        rgb = image.pixel_array.astype(np.int32)
        assert rgb.shape == (source.Rows, source.Columns, 3)
        redness.append(rgb[..., 0] - rgb[..., 2])  # jet: red at the top of the scale, blue at the bottom
    hot = int(np.argmax([r.max() for r in redness]))
    assert hot == 3 and np.unravel_index(np.argmax(redness[3]), redness[3].shape) == (10, 21)
    assert redness[3].max() > 50 and max(r.max() for k, r in enumerate(redness) if k != 3) < 0

    with open(volume_csv, newline="") as fh:
        assert [r["overlay"] for r in csv.DictReader(fh)] == [vol.overlay]
    # run again: both outputs are found on disk, not written again
    stamps = [mtime(p) for p in overlay]
    volumes, _ = _score_with_volumes(scorer, records, tmp_path / "scores.csv", tmp_path / "heat", dicom_output="both",
                                     heatmap_range=scale)
    assert volumes.volumes[0].overlay == vol.overlay and [mtime(p) for p in overlay] == stamps


def test_cli_dicom_output_chooses_what_a_series_gives(tmp_path, capsys):
    pytest.importorskip("highdicom")
    write_mr_series(tmp_path / "series")
    detector = get_method("ganomaly").from_profile("tiny")
    detector.save(tmp_path / "model")

    def score(*extra):
        argv = ["score", tmp_path / "model", tmp_path / "series", "--out", tmp_path / "s.csv", "--heatmaps",
                tmp_path / "heat", "--workers", 0, "--no-progress", "--device", "cpu", "--overwrite", *extra]
        return main([str(a) for a in argv])

    assert score("--dicom-output", "secondary-capture") == 0
    written = sorted(p.name for p in (tmp_path / "heat" / "volumes").iterdir())
    assert len(written) == 1 and written[0].endswith("_overlay")
    assert len(list((tmp_path / "heat" / "volumes" / written[0]).glob("*.dcm"))) == 5
    capsys.readouterr()
    assert score("--dicom-output", "overlay") == 2
    assert "error:" in capsys.readouterr().err
