"""io.read_image: rasters, DICOM, NIfTI, MedMNIST .npz, and the errors every reader must raise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scanomaly.errors import ImageReadError, ScanomalyError
from scanomaly.io import is_image_file, read_image, read_npz_split


# ------------------------------------------------------------------------------------------
# raster
# ------------------------------------------------------------------------------------------
def test_png_8bit_gray(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    (img,) = read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (16, 16)
    np.testing.assert_allclose(img, arr / 255.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_scaled_by_bit_depth(tmp_path, suffix):
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / f"a{suffix}")
    (img,) = read_image(tmp_path / f"a{suffix}")
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)


def test_dark_16bit_png_is_not_stretched(tmp_path):
    arr = np.full((8, 8), 100, dtype=np.uint16)  # a dark 16-bit image stays dark
    Image.fromarray(arr).save(tmp_path / "dark.png")
    (img,) = read_image(tmp_path / "dark.png")
    assert img.max() < 0.01


def test_rgb_becomes_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    (img,) = read_image(tmp_path / "rgb.png")
    assert img.shape == (4, 4)
    np.testing.assert_allclose(img, round(200 * 0.299) / 255.0, atol=1 / 255)


def test_rgba_ignores_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    (a,) = read_image(tmp_path / "transparent.png")
    (b,) = read_image(tmp_path / "opaque.png")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, 120 / 255.0, atol=1e-6)


def test_corrupt_png_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError) as err:
        read_image(bad)
    assert "broken.png" in str(err.value)
    assert isinstance(err.value, ScanomalyError)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported format"):
        read_image(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "notes.txt")


def test_nan_float_tiff_rejected(tmp_path):
    arr = np.ones((8, 8), dtype=np.float32)
    arr[2, 3] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.tif")


def test_float_tiff_minmax(tmp_path):
    arr = np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    (img,) = read_image(tmp_path / "f.tif")
    assert img.min() == 0.0 and img.max() == pytest.approx(1.0)


def test_index_out_of_range(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "a.png", index=1)


def test_real_chest_png(chest_slice):
    (img,) = read_image(chest_slice[0].path)
    assert img.shape == (128, 128) and img.dtype == np.float32
    assert 0.0 <= img.min() < img.max() <= 1.0


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------
def write_dicom(path, arr, photometric="MONOCHROME2", **attrs):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    if arr is not None:
        arr = np.asarray(arr, dtype=np.uint16)
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
        ds.PixelData = arr.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)
    return path


RAMP = (np.arange(64).reshape(8, 8) * 10).astype(np.uint16)  # 0 .. 630


def test_dicom_without_window_scales_by_its_bit_depth(tmp_path):
    # the range the stored integers can take (16 bits here), as for a 16-bit PNG: not the image's own range
    (img,) = read_image(write_dicom(tmp_path / "a.dcm", RAMP))
    np.testing.assert_allclose(img, RAMP / 65535.0, atol=1e-7)
    (img12,) = read_image(write_dicom(tmp_path / "b.dcm", RAMP, BitsStored=12, HighBit=11))
    np.testing.assert_allclose(img12, RAMP / 4095.0, atol=1e-7)
    (hu,) = read_image(write_dicom(tmp_path / "c.dcm", RAMP, BitsStored=12, HighBit=11, RescaleSlope=2,
                                   RescaleIntercept=-1000))
    np.testing.assert_allclose(hu, (RAMP * 2.0 - 1000 - (-1000)) / (4095 * 2.0), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    (m2,) = read_image(write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2"))
    (m1,) = read_image(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == pytest.approx(1.0)  # the lowest stored value is white


def test_dicom_rescale_and_first_window(tmp_path):
    stored = (np.arange(64).reshape(8, 8) * 30).astype(np.uint16)  # 0 .. 1890
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=[0, 500], WindowWidth=[400, 2000])
    (img,) = read_image(path)
    hu = stored * 2.0 - 1000.0
    expected = np.clip((hu - (-200.0)) / 400.0, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_dicom_single_valued_window(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=300, WindowWidth=200)
    (img,) = read_image(path)
    np.testing.assert_allclose(img, np.clip((RAMP - 200.0) / 200.0, 0, 1), atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    with pytest.raises(ImageReadError, match="no pixel data") as err:
        read_image(write_dicom(tmp_path / "report.dcm", None))
    assert "report.dcm" in str(err.value)


def test_dicom_multiframe(tmp_path):
    frames = np.stack([RAMP, RAMP * 2, RAMP * 3])
    path = write_dicom(tmp_path / "multi.dcm", frames)
    images = read_image(path)
    assert len(images) == 3 and all(im.shape == (8, 8) for im in images)
    np.testing.assert_allclose(images[2], frames[2] / 65535.0, atol=1e-7)  # one scale (the bit depth) for all frames
    (second,) = read_image(path, index=1)
    np.testing.assert_array_equal(second, images[1])


def test_dicom_without_extension_is_recognised(tmp_path):
    path = write_dicom(tmp_path / "IM0001", RAMP)
    assert is_image_file(path)
    (img,) = read_image(path)
    assert img.shape == (8, 8)


def test_not_a_dicom(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 300)
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_image(bad)


# ------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------
def write_nifti(path, data):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), str(path))
    return path


def test_nifti_2d(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    images = read_image(write_nifti(tmp_path / "a.nii", data))
    assert len(images) == 1
    np.testing.assert_allclose(images[0], data / 11.0, atol=1e-6)


def test_nifti_3d_slices_share_the_volume_range(tmp_path):
    vol = np.zeros((6, 5, 4), dtype=np.float32)
    for k in range(4):
        vol[..., k] = k * 10 + np.arange(30).reshape(6, 5) / 10
    path = write_nifti(tmp_path / "vol.nii.gz", vol)
    images = read_image(path)
    assert len(images) == 4 and images[0].shape == (5, 6)  # rows = the A axis, columns = the R axis
    lo, hi = vol.min(), vol.max()
    for k in range(4):
        # identity affine = RAS+: radiological view puts anterior (high y) on top, the patient's right (high x) left
        np.testing.assert_allclose(images[k], ((vol[..., k] - lo) / (hi - lo))[::-1, ::-1].T, atol=1e-5)
    middle = read_image(path, slice_range=(1, 3))
    assert len(middle) == 2
    np.testing.assert_array_equal(middle[0], images[1])
    (third,) = read_image(path, index=2)
    np.testing.assert_array_equal(third, images[2])
    with pytest.raises(ImageReadError, match="selects no slice"):
        read_image(path, slice_range=(10, 12))


def test_nifti_slices_do_not_depend_on_the_storage_order(tmp_path):
    import nibabel as nib

    from scanomaly.io import describe_file

    ras = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)  # x: L->R, y: P->A, z: I->S
    nib.save(nib.Nifti1Image(ras, np.eye(4)), str(tmp_path / "ras.nii"))
    # the same head stored as a sagittal stack in LPS order: stored axes (z, y, x), with y and x flipped
    lps_sagittal = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0))
    affine = np.zeros((4, 4))
    affine[0, 2] = -1  # stored axis 2 runs right -> left
    affine[1, 1] = -1  # stored axis 1 runs anterior -> posterior
    affine[2, 0] = 1  # stored axis 0 runs inferior -> superior
    affine[:3, 3] = (5, 4, 0)
    affine[3, 3] = 1
    nib.save(nib.Nifti1Image(lps_sagittal, affine), str(tmp_path / "lps.nii"))

    a, b = read_image(tmp_path / "ras.nii"), read_image(tmp_path / "lps.nii")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert describe_file(tmp_path / "lps.nii")["n_images"] == 4  # counted along S from the header alone
    np.testing.assert_array_equal(read_image(tmp_path / "lps.nii", index=3)[0], a[3])


def test_nifti_trailing_singleton_axis_is_3d(tmp_path):
    images = read_image(write_nifti(tmp_path / "v.nii", np.random.default_rng(0).random((4, 4, 3, 1))))
    assert len(images) == 3


def test_nifti_4d_refused(tmp_path):
    with pytest.raises(ImageReadError, match="4-D") as err:
        read_image(write_nifti(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 3, 2))))
    assert "fmri.nii.gz" in str(err.value)


def test_nifti_nan_refused(tmp_path):
    vol = np.ones((4, 4, 2), dtype=np.float32)
    vol[1, 1, 1] = np.inf
    with pytest.raises(ImageReadError, match="NaN or inf"):
        read_image(write_nifti(tmp_path / "inf.nii", vol))


def test_slice_range_only_for_nifti(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="NIfTI"):
        read_image(tmp_path / "a.png", slice_range=(0, 1))


# ------------------------------------------------------------------------------------------
# MedMNIST .npz
# ------------------------------------------------------------------------------------------
def write_medmnist(path, rgb=False, sizes=(5, 2, 3), size=8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    np.savez_compressed(path, **arrays)
    return path, arrays


def test_npz_all_splits_in_order(tmp_path):
    path, arrays = write_medmnist(tmp_path / "m.npz")
    images = read_image(path)
    assert len(images) == 10
    np.testing.assert_allclose(images[0], arrays["train_images"][0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(images[5], arrays["val_images"][0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(images[9], arrays["test_images"][2] / 255.0, atol=1e-6)
    (seventh,) = read_image(path, index=7)
    np.testing.assert_array_equal(seventh, images[7])


def test_npz_split_and_labels(tmp_path):
    path, arrays = write_medmnist(tmp_path / "m.npz")
    images, labels = read_npz_split(path, "val")
    assert len(images) == 2 and labels.shape == (2,) and labels.tolist() == [0, 1]
    with pytest.raises(ImageReadError, match="unknown split"):
        read_npz_split(path, "holdout")


def test_npz_rgb_to_gray(tmp_path):
    path, arrays = write_medmnist(tmp_path / "rgb.npz", rgb=True)
    images, _ = read_npz_split(path, "train")
    expected = arrays["train_images"][0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    np.testing.assert_allclose(images[0], expected, atol=1e-5)


def test_npz_not_medmnist(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(ImageReadError, match="MedMNIST"):
        read_image(tmp_path / "other.npz")


def test_npz_nan_rejected(tmp_path):
    imgs = np.zeros((2, 4, 4), dtype=np.float32)
    imgs[0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", train_images=imgs)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.npz")


def test_real_pneumoniamnist(data_root):
    path = data_root / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    images, labels = read_npz_split(path, "val")
    assert len(images) == len(labels) > 0
    assert images[0].shape == (28, 28) and images[0].dtype == np.float32
    assert set(np.unique(labels).tolist()) == {0, 1}
    (first_test,) = read_image(path, index=len(read_npz_split(path, "train")[0]) + len(images))
    np.testing.assert_array_equal(first_test, read_npz_split(path, "test")[0][0])


def test_dicom_without_preamble(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "full.dcm", RAMP)
    ds = pydicom.dcmread(str(path))
    bare = tmp_path / "bare.dcm"
    ds.preamble = None
    del ds.file_meta
    ds.save_as(str(bare), implicit_vr=False, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    (img,) = read_image(bare)
    np.testing.assert_allclose(img, RAMP / 65535.0, atol=1e-7)
