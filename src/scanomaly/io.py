"""Medical image reading: one entry point, every image becomes float32 [H, W] in [0, 1].

`read_image(path)` returns a list of 2-D arrays, because some files hold several images
(a NIfTI volume gives its axial slices, a multi-frame DICOM its frames, an .npz every image
of a MedMNIST file). Every failure raises `ImageReadError` naming the file, so callers can
skip and report it.

Formats and intensity rules:
- PNG / JPEG / TIFF / BMP: 8-bit divides by 255, 16-bit by 65535 (the bit depth, not the image's
  range), float TIFFs are min-max scaled; RGB is converted to gray (ITU-R 601 luma), alpha ignored.
  Only the first page of a multi-page TIFF is read.
- DICOM (.dcm, .dicom, or any file with the DICM preamble): RescaleSlope / RescaleIntercept are
  applied, then the first WindowCenter / WindowWidth when present; without a window, the range the
  stored integers can take (BitsStored, signed or not, through the same rescale) maps to [0, 1]: the
  bit depth, as for PNG, not the image's own range, so that the same pixels as an 8-bit PNG and as
  an 8-bit DICOM without a window are the same image. Float pixel data is min-max scaled.
  MONOCHROME1 is inverted so that high values are bright. Multi-frame gives one image per frame.
- Every format: an image smaller than MIN_IMAGE_SIDE pixels on a side is refused (named, and skipped
  by runs over many files): resized up to a model's input it would be a blur that reads as normal.
  Per-image normalisation, for data whose exposure varies, is the model's preprocessing option
  `intensity` (minmax, percentile, equalize), saved with the model.
- NIfTI (.nii, .nii.gz): a 2-D image gives one image (stored order); a 3-D volume is first turned to
  the closest canonical (RAS+) orientation from its affine, so whatever the scanner's storage order its
  slices are axial, inferior to superior, each shown radiologically (anterior at the top, the patient's
  right on the image's left); all scaled by the volume's min-max, optionally only
  `slice_range=(start, stop)` (indices in that inferior-to-superior order). Trailing axes of length 1
  are dropped; real 4-D data is refused.
- .npz in the MedMNIST layout (`{train,val,test}_images` uint8 [N, H, W] or [N, H, W, 3], with
  `{split}_labels`): all images of train, val, test in that order, or one by `index`.
  `read_npz_split(path, split)` gives one split and its labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageReadError

MIN_IMAGE_SIDE = 16  # pixels: the smallest image (either side) that is read as an image to score

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}
NPZ_SUFFIXES = {".npz"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES | NPZ_SUFFIXES
NPZ_SPLITS = ("train", "val", "test")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # the weights PIL uses for RGB -> L


def suffix_of(path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_dicom_file(path) -> bool:
    """True for a file carrying the DICOM preamble ('DICM' at byte 128), whatever its name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_image_file(path) -> bool:
    suffix = suffix_of(path)
    if suffix in IMAGE_SUFFIXES:
        return True
    # DICOM series are often stored without a file extension
    return suffix == "" and is_dicom_file(path)


def read_image(path, index: int | None = None, slice_range: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Read one file into a list of float32 [H, W] images in [0, 1].

    `index` selects one image of a multi-image file (a frame of a DICOM, a slice of a volume,
    an image of an .npz in train, val, test order); it counts from the start of the file.
    `slice_range=(start, stop)` keeps slices start..stop-1 of a NIfTI volume (Python slice rules).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    suffix = suffix_of(path)
    if slice_range is not None and suffix not in NIFTI_SUFFIXES:
        raise ImageReadError(path, "slice_range applies to NIfTI volumes only")
    try:
        if suffix in RASTER_SUFFIXES:
            images = [read_raster(path)]
        elif suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and is_dicom_file(path)):
            images = read_dicom(path)
        elif suffix in NIFTI_SUFFIXES:
            images = read_nifti(path, slice_range=slice_range, index=index)
            index = None  # read_nifti already selected it
        elif suffix in NPZ_SUFFIXES:
            images = read_npz(path)
        else:
            raise ImageReadError(path, f"unsupported format {suffix or '(no extension)'!r}; supported: {sorted(IMAGE_SUFFIXES)}")
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure is a property of the file, not a bug here
        raise ImageReadError(path, f"cannot read ({exc.__class__.__name__}: {exc})") from None
    if index is not None:
        if not 0 <= index < len(images):
            raise ImageReadError(path, f"index {index} out of range (file holds {len(images)} images)")
        images = [images[index]]
    if not images:
        raise ImageReadError(path, "the file holds no images")
    return [_check_finite(path, im) for im in images]


# ------------------------------------------------------------------------------------------
# raster
# ------------------------------------------------------------------------------------------
def read_raster(path: Path) -> np.ndarray:
    """PNG / JPEG / TIFF / BMP, 8 or 16 bit, gray, RGB or RGBA -> gray float32 [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
            elif im.mode == "I":
                arr = np.asarray(im, dtype=np.float32)
                # 32-bit integer images: 16-bit data decoded as "I" (bit depth), else the image's range
                if arr.min() >= 0 and arr.max() <= 65535:
                    arr = arr / (65535.0 if arr.max() > 255 else 255.0)
                else:
                    arr = _minmax(arr)
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise ImageReadError(path, "contains NaN or inf values")
                arr = _minmax(arr)
            else:
                # "RGBA"/"LA"/"P" -> "L" uses the colour channels only; alpha is ignored
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------
def _first(value) -> float | None:
    """DICOM multi-valued attributes (WindowCenter = [40, 400]) -> their first value."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _assume_transfer_syntax(ds) -> None:
    """A dataset read without file meta: take the transfer syntax from the encoding it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def read_dicom(path: Path) -> list[np.ndarray]:
    """One image per frame, windowed (or min-max scaled) to [0, 1]."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError as exc:
        if suffix_of(path) not in DICOM_SUFFIXES:
            raise ImageReadError(path, f"not a DICOM file ({exc})") from None
        try:  # some .dcm files lack the 128-byte preamble and file meta header
            ds = pydicom.dcmread(str(path), force=True)
            if "PixelData" not in ds and "Rows" not in ds:
                raise ValueError("no image attributes")
            _assume_transfer_syntax(ds)
        except Exception:
            raise ImageReadError(path, f"not a DICOM file ({exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data (e.g. a structured report or presentation state)")
    try:
        arr = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})") from None

    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if samples == 3:  # colour (pydicom gives RGB): [F,] H, W, 3 -> gray
        arr = arr @ _LUMA
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageReadError(path, f"unexpected DICOM pixel array shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ImageReadError(path, "contains NaN or inf values")

    slope = _first(getattr(ds, "RescaleSlope", None))
    intercept = _first(getattr(ds, "RescaleIntercept", None))
    arr = arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)

    center = _first(getattr(ds, "WindowCenter", None))
    width = _first(getattr(ds, "WindowWidth", None))
    stored = _stored_range(ds, slope, intercept)
    if center is not None and width is not None and width > 0:
        lo, hi = center - width / 2.0, center + width / 2.0
        arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    elif stored is not None:
        lo, hi = stored
        arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    else:  # float pixel data: no bit depth to go by
        arr = _minmax(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: the lowest value is displayed white
    return [np.ascontiguousarray(f, dtype=np.float32) for f in arr]


def _stored_range(ds, slope: float | None, intercept: float | None) -> tuple[float, float] | None:
    """The values integer pixel data can take (BitsStored; PixelRepresentation 1 = signed), after the
    rescale: the intensity scale of a DICOM without a window. None for float pixel data."""
    if "PixelData" not in ds:
        return None
    try:
        bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        return None
    if not 1 <= bits <= 32:
        return None
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0 ** bits - 1
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return (lo, hi) if hi > lo else None


# ------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------
def read_nifti(path: Path, slice_range: tuple[int, int] | None = None, index: int | None = None) -> list[np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if len(img.shape) >= 3:
            # storage order differs between scanners and converters (LPS, sagittal stacks, ...): the affine
            # says where each axis points, and RAS+ makes the last axis inferior -> superior
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise ImageReadError(path, f"cannot read NIfTI ({exc.__class__.__name__}: {exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise ImageReadError(path, f"{data.ndim}-D NIfTI (shape {data.shape}) is not supported (4-D and higher); "
                                   "extract a 3-D volume first")
    if data.ndim < 2:
        raise ImageReadError(path, f"NIfTI with shape {data.shape} is not an image")
    if not np.isfinite(data).all():
        raise ImageReadError(path, "contains NaN or inf values")
    scaled = _minmax(data)  # one range for the whole volume, so slices stay comparable
    if scaled.ndim == 2:
        if slice_range is not None:
            raise ImageReadError(path, "slice_range given, but the NIfTI image is 2-D")
        if index not in (None, 0):
            raise ImageReadError(path, f"index {index} out of range (a 2-D NIfTI holds 1 image)")
        return [scaled]
    n = scaled.shape[-1]
    positions = list(range(n))
    if slice_range is not None:
        start, stop = slice_range
        positions = positions[slice(start, stop)]
        if not positions:
            raise ImageReadError(path, f"slice_range {tuple(slice_range)} selects no slice (volume has {n} slices)")
    if index is not None:
        if index not in positions:
            raise ImageReadError(path, f"slice index {index} out of range (volume has {n} slices"
                                       + (f", slice_range {tuple(slice_range)})" if slice_range is not None else ")"))
        positions = [index]
    # RAS+ slice [x, y] -> radiological view: rows anterior -> posterior, columns patient right -> left
    return [np.ascontiguousarray(scaled[::-1, ::-1, k].T) for k in positions]


def _nifti_slice_count(img) -> int:
    """Slices read_nifti gives for a volume, from the header alone: the length of the axis the affine points
    inferior -> superior (the canonical last axis)."""
    import nibabel as nib

    spatial = nib.io_orientation(img.affine)[:, 0]  # output axis (0 = R, 1 = A, 2 = S) of each stored axis
    return int(img.shape[int(np.flatnonzero(spatial == 2)[0])])


# ------------------------------------------------------------------------------------------
# MedMNIST .npz
# ------------------------------------------------------------------------------------------
def _npz_to_unit(path, arr: np.ndarray) -> np.ndarray:
    """[N, H, W] or [N, H, W, 3] of any dtype -> gray float32 [N, H, W] in [0, 1]."""
    dtype = arr.dtype
    if arr.ndim == 4 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float32) @ _LUMA  # RGB -> luma, alpha ignored
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ImageReadError(path, f"expected images of shape [N, H, W] or [N, H, W, 3], got {arr.shape}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ImageReadError(path, "contains NaN or inf values")
    if dtype == np.uint16:
        out = out / 65535.0
    elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        out = out / (1.0 if dtype == np.bool_ else 255.0)
    elif out.size and (out.min() < 0 or out.max() > 1):  # floats outside [0, 1]: the data's own range
        out = _minmax(out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _open_npz(path):
    try:
        return np.load(str(path), allow_pickle=False)
    except Exception as exc:
        raise ImageReadError(path, f"cannot read .npz ({exc.__class__.__name__}: {exc})") from None


def npz_splits(path) -> list[str]:
    """The MedMNIST splits an .npz holds, in train, val, test order."""
    path = Path(path)
    with _open_npz(path) as npz:
        present = [s for s in NPZ_SPLITS if f"{s}_images" in npz.files]
        if not present:
            raise ImageReadError(path, f"not a MedMNIST-style .npz (expected train_images / val_images / test_images, "
                                       f"found {sorted(npz.files)})")
    return present


def read_npz_split(path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """One split of a MedMNIST .npz: (images as float32 [H, W] in [0, 1], labels).

    Labels are `{split}_labels` flattened to [N] when stored as [N, 1] (left [N, K] for multi-label
    files); all -1 when the file has no labels for the split.
    """
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise ImageReadError(path, f"unknown split {split!r}; use one of {NPZ_SPLITS}")
    with _open_npz(path) as npz:
        key = f"{split}_images"
        if key not in npz.files:
            raise ImageReadError(path, f"no {key!r} in the file (found {sorted(npz.files)})")
        images = _npz_to_unit(path, npz[key])
        lkey = f"{split}_labels"
        if lkey in npz.files:
            labels = np.asarray(npz[lkey])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            labels = labels.astype(np.int64)
            if len(labels) != len(images):
                raise ImageReadError(path, f"{lkey} has {len(labels)} rows but {key} has {len(images)} images")
        else:
            labels = np.full(len(images), -1, dtype=np.int64)
    out = [np.ascontiguousarray(im) for im in images]
    for im in out:
        _check_finite(path, im)
    return out, labels


def read_npz(path: Path) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for split in npz_splits(path):
        images.extend(read_npz_split(path, split)[0])
    return images


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def describe_file(path) -> dict:
    """A cheap header summary for `scanomaly info`: format, mode, size (W x H) and image count."""
    path = Path(path)
    suffix = suffix_of(path)
    try:
        if suffix in RASTER_SUFFIXES:
            with Image.open(path) as im:
                return {"format": im.format or suffix.lstrip(".").upper(), "mode": im.mode,
                        "size": f"{im.width}x{im.height}", "n_images": 1}
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            img = nib.load(str(path))
            shape = img.shape
            return {"format": "NIfTI", "mode": "volume" if len(shape) >= 3 else "2-D",
                    "size": "x".join(str(s) for s in shape), "n_images": _nifti_slice_count(img) if len(shape) >= 3 else 1}
        if suffix in NPZ_SUFFIXES:
            with _open_npz(path) as npz:
                shapes = [npz[f"{s}_images"].shape for s in NPZ_SPLITS if f"{s}_images" in npz.files]
            if not shapes:
                raise ImageReadError(path, "not a MedMNIST-style .npz")
            s = shapes[0]
            return {"format": "NPZ", "mode": "RGB" if len(s) == 4 else "L", "size": f"{s[2]}x{s[1]}",
                    "n_images": int(sum(x[0] for x in shapes))}
        if suffix in DICOM_SUFFIXES or is_dicom_file(path):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return {"format": "DICOM", "mode": str(getattr(ds, "PhotometricInterpretation", "?")),
                    "size": f"{getattr(ds, 'Columns', '?')}x{getattr(ds, 'Rows', '?')}",
                    "n_images": int(getattr(ds, "NumberOfFrames", 1) or 1)}
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, f"cannot read header ({exc.__class__.__name__}: {exc})") from None
    raise ImageReadError(path, f"unsupported format {suffix or '(no extension)'!r}")


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return np.zeros_like(arr, dtype=np.float32) if hi - lo < 1e-12 else ((arr - lo) / (hi - lo)).astype(np.float32)


def check_image_size(path, img: np.ndarray) -> np.ndarray:
    """Refuse an image smaller than MIN_IMAGE_SIDE on a side (it would be scored as a featureless blur)."""
    if min(img.shape[:2]) < MIN_IMAGE_SIDE:
        raise ImageReadError(path, f"image is {img.shape[1]}x{img.shape[0]} pixels; scanomaly reads images of at "
                                   f"least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    return img


def _check_finite(path, img: np.ndarray) -> np.ndarray:
    if img.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D image, got shape {img.shape}")
    if img.size == 0:
        raise ImageReadError(path, "empty image")
    if not np.isfinite(img).all():
        raise ImageReadError(path, "contains NaN or inf values")
    return img
