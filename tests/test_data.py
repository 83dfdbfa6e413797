"""data.discover / load_images: layouts, manifests, .npz, skipping and reporting bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scanomaly.data import ABNORMAL, NORMAL, UNKNOWN, ImageRecord, discover, load_images
from scanomaly.errors import ScanomalyError
from scanomaly.preprocess import Preprocessing, equalise_histogram

PREP = Preprocessing(image_size=16)


def _png(path, value=128, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def test_discover_train_test_tree(tiny_tree):
    records = discover(tiny_tree)
    assert len(records) == 24
    assert {r.split for r in records} == {"train", "test"}
    assert sum(r.label == ABNORMAL for r in records) == 12
    assert all(r.patient_id is None and r.index is None for r in records)


def test_discover_class_folders_with_masks(tmp_path):
    _png(tmp_path / "normal" / "n0.png")
    _png(tmp_path / "abnormal" / "a0.png")
    _png(tmp_path / "masks" / "a0.png", 255)
    records = discover(tmp_path)
    by_name = {r.name: r for r in records}
    assert by_name["n0.png"].label == NORMAL and by_name["n0.png"].mask_path is None
    assert by_name["a0.png"].mask_path.endswith("masks/a0.png")
    s = load_images(records, PREP, progress=False)
    assert s.masks is not None and s.masks.shape == (2, 16, 16)
    assert s.masks[[r.label == ABNORMAL for r in s.records].index(True)].all()


def test_plain_folder_is_unlabeled(tmp_path):
    _png(tmp_path / "x" / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "readme.txt").write_text("not an image")
    records = discover(tmp_path)
    assert len(records) == 2 and all(r.label == UNKNOWN for r in records)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanomalyError, match="no images found"):
        discover(tmp_path / "empty")
    with pytest.raises(ScanomalyError, match="no such file or folder"):
        discover(tmp_path / "missing")


def test_manifest_csv(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    _png(tmp_path / "masks" / "b.png", 255)
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,mask_file\nimgs/a.png,normal,P1,\nimgs/b.png,1,P2,masks/b.png\n"
    )
    a, b = discover(tmp_path / "m.csv")
    assert (a.label, a.patient_id, a.mask_path) == (NORMAL, "P1", None)
    assert (b.label, b.patient_id) == (ABNORMAL, "P2")
    assert b.path == str(tmp_path / "imgs" / "b.png") and b.mask_path == str(tmp_path / "masks" / "b.png")


def test_manifest_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("path,label\na.png,sick\n")
    with pytest.raises(ScanomalyError, match="unknown label"):
        discover(tmp_path / "bad.csv")
    (tmp_path / "nopath.csv").write_text("name,label\na.png,normal\n")
    with pytest.raises(ScanomalyError, match="'path' column"):
        discover(tmp_path / "nopath.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ScanomalyError, match="no rows"):
        discover(tmp_path / "empty.csv")


def test_folder_manifest_adds_patient_ids(tmp_path):
    _png(tmp_path / "normal" / "p1_1.png")
    _png(tmp_path / "abnormal" / "p1_2.png")
    (tmp_path / "manifest.csv").write_text("file,label,patient_id\nnormal/p1_1.png,normal,P1\nabnormal/p1_2.png,abnormal,P1\n")
    assert {r.patient_id for r in discover(tmp_path)} == {"P1"}


def test_bad_files_are_skipped_and_reported(tiny_tree):
    bad = tiny_tree / "train" / "normal" / "zz_corrupt.png"
    bad.write_bytes(b"definitely not a png" * 10)
    records = discover(tiny_tree)
    s = load_images(records, PREP, progress=False)
    assert len(s) == len(records) - 1
    assert len(s.skipped) == 1 and s.skipped[0]["path"] == str(bad) and s.skipped[0]["reason"]
    assert s.images.shape == (len(records) - 1, 1, 16, 16)
    assert float(s.images.min()) >= -1 and float(s.images.max()) <= 1


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(ScanomalyError, match="no readable images"):
        load_images(tmp_path, PREP, progress=False)


def test_unreadable_mask_skips_only_its_image(tmp_path):
    _png(tmp_path / "normal" / "n.png")
    _png(tmp_path / "abnormal" / "a.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"broken mask")
    s = load_images(discover(tmp_path), PREP, progress=False)
    assert [r.name for r in s.records] == ["n.png"]
    assert "mask" in s.skipped[0]["reason"]


def test_npz_discover_and_load(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "m.npz",
        train_images=rng.integers(0, 256, (4, 16, 16), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0], [1]], dtype=np.uint8),
        val_images=rng.integers(0, 256, (2, 16, 16), dtype=np.uint8),
        val_labels=np.array([[1], [0]], dtype=np.uint8),
        test_images=rng.integers(0, 256, (2, 16, 16), dtype=np.uint8),
        test_labels=np.array([[0], [1]], dtype=np.uint8),
    )
    records = discover(tmp_path / "m.npz")
    assert [r.split for r in records] == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    assert [r.index for r in records] == list(range(8))
    assert [r.label for r in records] == [0, 1, 0, 1, 1, 0, 0, 1]
    s = load_images(records[4:], Preprocessing(image_size=8), progress=False)
    assert len(s) == 4 and [r.index for r in s.records] == [4, 5, 6, 7]
    # the same folder, as a plain folder, expands the .npz too
    assert len(discover(tmp_path)) == 8


def test_multi_image_file_expands(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 3)).astype(np.float32), np.eye(4)),
             str(tmp_path / "vol.nii.gz"))
    s = load_images(discover(tmp_path), PREP, progress=False)
    assert len(s) == 3 and [r.index for r in s.records] == [0, 1, 2]
    assert s.records[1].name == "vol.nii.gz#1"


def test_subset_keeps_records_and_skipped(tiny_tree):
    s = load_images(tiny_tree, PREP, progress=False)
    sub = s.subset([0, 2])
    assert len(sub) == 2 and sub.records == [s.records[0], s.records[2]]
    assert sub.labels.tolist() == [s.records[0].label, s.records[2].label]


def test_real_chest_slice_loads(chest_slice):
    s = load_images(chest_slice, Preprocessing(image_size=32), progress=False)
    assert s.images.shape == (48, 1, 32, 32) and not s.skipped
    assert s.labels.sum() == 24


def test_real_lgg_has_patients_and_masks(data_root):
    root = data_root / "lgg_flair"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    records = discover(root)
    assert all(r.patient_id for r in records)
    abnormal = [r for r in records if r.label == ABNORMAL]
    assert abnormal and all(r.mask_path for r in abnormal)
    s = load_images(abnormal[:4], Preprocessing(image_size=32), progress=False)
    assert s.masks is not None and s.masks.any()


def test_records_are_hashable_and_named():
    r = ImageRecord("/x/y.png", index=3)
    assert r.name == "y.png#3" and len({r, ImageRecord("/x/y.png", index=3)}) == 1


def test_histogram_equalisation_undoes_a_change_of_exposure():
    rng = np.random.default_rng(0)
    scan = rng.beta(2, 5, (64, 64)).astype(np.float32)  # a dark, low-contrast image
    brighter = 0.3 + 0.6 * scan  # the same anatomy exposed / windowed differently
    eq_scan, eq_brighter = equalise_histogram(scan), equalise_histogram(brighter)
    assert eq_scan.dtype == np.float32 and eq_scan.min() == 0.0 and eq_scan.max() > 0.99
    # intensities are spread evenly, and the order of pixels is kept
    assert np.all(np.abs(np.histogram(eq_scan, bins=4, range=(0, 1))[0] / scan.size - 0.25) < 0.02)
    order = np.argsort(scan, axis=None)
    assert np.all(np.diff(eq_scan.ravel()[order]) >= 0)
    # both exposures map to (nearly) the same image, which a plain rescale of the raw ones would not
    assert np.abs(eq_scan - eq_brighter).max() < 0.03
    assert np.abs(scan - brighter).mean() > 0.15
    assert not equalise_histogram(np.full((8, 8), 0.4, np.float32)).any()


def test_preprocessing_can_equalise():
    img = np.linspace(0.2, 0.4, 32 * 32, dtype=np.float32).reshape(32, 32)
    t = Preprocessing(image_size=16, center_crop=False, intensity="equalize").apply(img)
    assert t.shape == (1, 16, 16) and t.min() < -0.9 and t.max() > 0.9  # stretched to the full range
    with pytest.raises(ScanomalyError, match="intensity"):
        Preprocessing(intensity="histogram")


def test_intensity_none_from_the_command_line():
    # `--set intensity=none` parses "none" as None: it must mean no intensity change, not an error
    from scanomaly.detector import get_method
    from scanomaly.options import parse_set, split_options

    config, prep = split_options(get_method("healthygan"), parse_set(["intensity=none", "top_crop=0"]))
    det = get_method("healthygan").from_profile("tiny", config, prep)
    assert det.preprocessing.intensity == "none" and det.preprocessing.top_crop == 0
    img = np.linspace(0.2, 0.4, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert np.array_equal(Preprocessing(intensity=None).apply(img), Preprocessing(intensity="none").apply(img))
