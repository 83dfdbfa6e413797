"""Heatmap volumes: the anomaly map and healthy translation of a scanned volume, on the volume's own grid.

A model sees one slice at a time, cropped and resized to its input size. A researcher looks at volumes
in 3D Slicer, ITK-SNAP or a PACS viewer. This module takes the per-slice maps back to the scan:

1. Find the volumes among the scored records: a 3-D NIfTI file (its slices are records `index` 0..n-1,
   in the canonical inferior -> superior order `io.read_nifti` gives), or a DICOM series (single-frame
   files sharing a SeriesInstanceUID, with a position and orientation per slice).
2. Collect each slice's anomaly map and healthy translation as `score_stream` scores it (`add`, its
   `on_scored` hook); a volume whose slices were scored by an earlier, interrupted run is scored again
   here, whole, when the run finishes.
3. Undo the model's geometry per slice (`slice_to_grid`): resize the S x S map to the crop box the
   preprocessing cut, place it in the full slice (0 outside it for the map; the scan itself for the
   translation).
4. Undo the reader's geometry: for NIfTI, the radiological view, then the RAS+ reorientation, so the
   output has the shape, affine and orientation of the file read (the header is the input's, data type
   float32). For DICOM, each frame is the stored pixel grid of its source image.
5. Write: NIfTI `<volume>_anomaly_map.nii.gz` and `<volume>_healthy.nii.gz` (the translation in the
   scan's own intensity units: the volume's min-max scaling undone); for a DICOM series (`dicom_output`)
   a Parametric Map (highdicom) referencing every source image: uint16 pixels with a real world value
   mapping (value = slope * stored + intercept, slope = (max - min) / 65535), so a stored value is the map
   to within slope / 2; and / or, for viewers that cannot show a Parametric Map, a Secondary Capture
   series `<volume>_overlay/` (highdicom SCImage, in the source's study): one RGB image per source slice,
   in slice order, each referencing its slice, the scan with the map blended in colour (the run's
   heatmap colour scale, `jet` as the panels, more opaque where the map is higher).
6. One score per volume, in `<scores stem>_volumes.csv`: the mean, max and mean of the top k slice
   scores (`metrics.patient_scores`, the rules of `evaluate --per-patient`), from the scores CSV.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .data import ImageRecord
from .errors import ScanomalyError
from .io import DICOM_SUFFIXES, NIFTI_SUFFIXES, RASTER_SUFFIXES, is_dicom_file, read_image, suffix_of
from .metrics import patient_scores
from .preprocess import Preprocessing, to_unit_range
from .scores_csv import record_key
from .streaming import HEATMAP_PERCENTILE, saved_scale

VOLUME_DIR = "volumes"
TOP_K = 3  # k of the top-k mean, as `evaluate --top-k` defaults
MAP_SUFFIX = "_anomaly_map"
HEALTHY_SUFFIX = "_healthy"
OVERLAY_SUFFIX = "_overlay"
VOLUME_COLUMNS = ("volume", "kind", "n_slices", "mean", "max", f"top{TOP_K}_mean", "label", "anomaly_map", "healthy",
                  "overlay")
DICOM_OUTPUTS = ("parametric-map", "secondary-capture", "both")


# ------------------------------------------------------------------------------------------
# 3. the model's geometry, undone
# ------------------------------------------------------------------------------------------
def slice_to_grid(values: np.ndarray, preprocessing: Preprocessing, shape: tuple[int, int], fill) -> np.ndarray:
    """An [S, S] map of the model's input back onto the [H, W] slice it was cut from: resized (bilinear)
    to the crop box, placed there; `fill` (a number or an [H, W] array) everywhere else."""
    height, width = shape
    top, left, bottom, right = preprocessing.crop_box(height, width)
    out = np.empty((height, width), np.float32)
    out[...] = fill
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (bottom - top, right - left):
        pil = Image.fromarray(np.ascontiguousarray(values), mode="F")
        values = np.asarray(pil.resize((right - left, bottom - top), Image.BILINEAR), dtype=np.float32)
    out[top:bottom, left:right] = values
    return out


def _gray(healthy) -> np.ndarray:
    """A model output [C, S, S] in [-1, 1] -> [S, S] in [0, 1]."""
    import torch

    return to_unit_range(torch.as_tensor(np.asarray(healthy, dtype=np.float32))).mean(dim=0).numpy()


# ------------------------------------------------------------------------------------------
# 1. the volumes among the records
# ------------------------------------------------------------------------------------------
@dataclass
class Volume:
    kind: str  # "nifti" or "dicom"
    name: str  # file stem (NIfTI) or SeriesInstanceUID (DICOM): names the outputs
    keys: list[tuple]  # record_key of each slice scored, in slice order
    files: list[str]  # the NIfTI file, or the DICOM files in slice order
    label: int = -1
    maps: dict = field(default_factory=dict)  # record key -> [S, S] map
    healthy: dict = field(default_factory=dict)  # record key -> [S, S] in [0, 1]
    outputs: tuple[str, str] | None = None  # (map, healthy) paths once written ("" where not written)
    overlay: str = ""  # the Secondary Capture series' folder, once written
    seen: bool = False  # a slice of it was scored by this run

    @property
    def complete(self) -> bool:
        return len(self.maps) == len(self.keys)


def _nifti_slices(path: str) -> int | None:
    """Slices of a NIfTI volume (its inferior -> superior axis), from the header; None for a 2-D image."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception:
        return None
    shape = img.shape
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        return None  # 2-D, or 4-D that io.read_nifti refuses
    spatial = nib.io_orientation(img.affine)[:3, 0]
    return int(shape[int(np.flatnonzero(spatial == 2)[0])])


def _dicom_header(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _slice_position(ds) -> float:
    """Where a slice lies along its series' normal (mm)."""
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))


def find_volumes(records: list[ImageRecord]) -> list[Volume]:
    """The NIfTI volumes and DICOM series among `records` (slices already expanded or not). A DICOM
    series needs single-frame images with ImagePositionPatient / ImageOrientationPatient / PixelSpacing,
    at least two of them; other DICOM files are images of their own and get no volume."""
    volumes: dict[str, Volume] = {}
    series: dict[str, list[tuple[float, str, ImageRecord]]] = {}
    for rec in records:
        suffix = suffix_of(rec.path)
        if suffix in NIFTI_SUFFIXES:
            n = _nifti_slices(rec.path)
            if n is None:
                continue
            vol = volumes.get(rec.path)
            if vol is None:
                name = Path(rec.path).name[: -len(suffix)]
                vol = volumes[rec.path] = Volume("nifti", name, [], [rec.path])
            indices = range(n) if rec.index is None else [rec.index]
            vol.keys.extend(record_key(rec.path, k) for k in indices)
            vol.label = max(vol.label, rec.label)
        elif suffix in DICOM_SUFFIXES or (suffix not in RASTER_SUFFIXES and is_dicom_file(rec.path)):
            ds = _dicom_header(rec.path)
            needed = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            if ds is None or any(a not in ds for a in needed) or int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append((_slice_position(ds), rec.path, rec))
    out = list(volumes.values())
    for uid, items in series.items():
        if len(items) < 2:
            continue
        items.sort(key=lambda t: (t[0], t[1]))
        vol = Volume("dicom", uid, [record_key(p, r.index) for _, p, r in items], [p for _, p, _ in items])
        vol.label = max(r.label for _, _, r in items)
        out.append(vol)
    # numbered in input order, so that names stay unique and sorted like the input
    return out


# ------------------------------------------------------------------------------------------
# 2. collecting slices as they are scored, then writing
# ------------------------------------------------------------------------------------------
class VolumeOutputs:
    """Per-volume outputs of a scoring run. `add` is `score_stream`'s `on_scored` hook; `finish` writes what
    remains and the per-volume scores CSV.

        volumes = VolumeOutputs(scorer, records, heatmap_dir)
        score_stream(scorer, records, out_csv, heatmap_dir=heatmap_dir, on_scored=volumes.add)
        volumes.finish(out_csv)
    """

    def __init__(self, scorer, records: list[ImageRecord], heatmap_dir, method: str | None = None,
                 dicom_output: str = "parametric-map"):
        if dicom_output not in DICOM_OUTPUTS:
            raise ScanomalyError(f"unknown DICOM output {dicom_output!r}; use one of {', '.join(DICOM_OUTPUTS)}")
        self.scorer = scorer
        self.dicom_output = dicom_output
        self.heatmap_range: tuple[float, float] | None = None  # the run's colour scale, once known
        self.preprocessing: Preprocessing = scorer.preprocessing
        self.method = method or getattr(scorer, "name", "scanomaly")
        self.dir = Path(heatmap_dir) / VOLUME_DIR
        self.volumes = find_volumes(records)
        self._by_key: dict[tuple, Volume] = {k: v for v in self.volumes for k in v.keys}
        self._series_of_file = {f: v.name for v in self.volumes if v.kind == "dicom" for f in v.files}
        self._mine: set[str] | None = None  # files of the records this process scores (None: all)
        self.seconds_writing = 0.0
        self.n_written = 0

    def __bool__(self) -> bool:
        return bool(self.volumes)

    def group_of(self, rec: ImageRecord) -> str:
        """What must be scored by one process for its volume to be whole: a DICOM series, else the file."""
        return self._series_of_file.get(rec.path, rec.path)

    def restrict(self, records: list[ImageRecord]) -> None:
        """This process scores only `records` (a shard, whole volumes): `finish` writes only their volumes."""
        self._mine = {r.path for r in records}

    def _is_mine(self, vol: Volume) -> bool:
        return self._mine is None or any(f in self._mine for f in vol.files)

    def output_stem(self, vol: Volume) -> Path:
        position = self.volumes.index(vol)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in vol.name)[:80]
        return self.dir / f"{position:04d}_{stem}"

    def add(self, records: list[ImageRecord], scores, maps, healthy, heatmap_range=None) -> None:
        """One scored batch: keep the slices of volumes; write each volume as soon as it is whole."""
        if heatmap_range is not None:
            self.heatmap_range = tuple(heatmap_range)
        for j, rec in enumerate(records):
            key = record_key(rec.path, rec.index)
            vol = self._by_key.get(key)
            if vol is None or vol.outputs is not None:
                continue
            vol.seen = True
            vol.maps[key] = np.asarray(maps[j], dtype=np.float32)
            if healthy is not None:
                vol.healthy[key] = _gray(healthy[j])
            if vol.complete:
                self._write(vol)

    def finish(self, out_csv, batch_size: int = 64, write_scores: bool = True) -> Path | None:
        """Score again the volumes an earlier run had partly scored (their maps are not in this process),
        write them, and (`write_scores`) the per-volume scores CSV beside `out_csv`. Returns that CSV's path
        (None: no volumes, or not written)."""
        if not self.volumes:
            return None
        if self.heatmap_range is None:  # nothing scored by this run: the scale it had
            self.heatmap_range = saved_scale(Path(out_csv))
        for vol in self.volumes:
            if not self._is_mine(vol):
                continue
            if vol.outputs is None and not vol.seen and self._written_before(vol):
                continue
            if vol.outputs is None:
                self._rescore(vol, batch_size)  # writes it once its slices are all in
            if vol.outputs is None:
                raise ScanomalyError(f"{vol.files[0]}: some slices of the volume could not be scored again")
        return self.write_scores(out_csv) if write_scores else None

    def write_scores(self, out_csv) -> Path:
        """The per-volume scores CSV of `out_csv`; volumes written by other processes are found on disk."""
        for vol in self.volumes:
            if vol.outputs is None:
                self._written_before(vol)
        return write_volume_scores(self.volumes, out_csv)

    def _written_before(self, vol: Volume) -> bool:
        """A volume none of whose slices this run scored, with outputs on disk: an earlier run wrote them
        (outputs are written whole, under a temporary name, then renamed)."""
        stem = self.output_stem(vol)
        if vol.kind == "nifti":
            anomaly = stem.with_name(stem.name + MAP_SUFFIX + ".nii.gz")
            if not anomaly.is_file():
                return False
            healthy = stem.with_name(stem.name + HEALTHY_SUFFIX + ".nii.gz")
            vol.outputs = (str(anomaly), str(healthy) if healthy.is_file() else "")
            return True
        anomaly = stem.with_name(stem.name + MAP_SUFFIX + ".dcm") if self.dicom_output != "secondary-capture" else None
        overlay = stem.with_name(stem.name + OVERLAY_SUFFIX) if self.dicom_output != "parametric-map" else None
        if (anomaly is not None and not anomaly.is_file()) or (overlay is not None and not overlay.is_dir()):
            return False
        vol.outputs = (str(anomaly or ""), "")
        vol.overlay = str(overlay or "")
        return True

    def _rescore(self, vol: Volume, batch_size: int) -> None:
        import torch

        images, keys = [], []
        for key, (path, index) in zip(vol.keys, self._paths(vol)):
            if key in vol.maps:
                continue
            arrays = read_image(path, index=index)
            images.append(self.preprocessing.apply(arrays[0]))
            keys.append(key)
        for start in range(0, len(images), batch_size):
            x = torch.stack(images[start : start + batch_size])
            _, maps, healthy = self.scorer.score_and_reconstruct(x, batch_size=len(x))
            recs = [ImageRecord(p, index=i) for p, i in (k for k in keys[start : start + batch_size])]
            self.add(recs, None, maps, healthy)

    def _paths(self, vol: Volume):
        if vol.kind == "nifti":
            return [(vol.files[0], k[1]) for k in vol.keys]
        return [(p, None) for p in vol.files]

    def _write(self, vol: Volume) -> None:
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_stem(vol)
        if vol.kind == "nifti":
            vol.outputs = write_nifti_outputs(vol, self.preprocessing, stem)
        else:
            vol.outputs = ("", "")
            if self.dicom_output != "secondary-capture":
                vol.outputs = write_dicom_parametric_map(vol, self.preprocessing, stem, self.method)
            if self.dicom_output != "parametric-map":
                vol.overlay = write_dicom_overlay(vol, self.preprocessing, stem, self.method, self.heatmap_range)
        vol.maps.clear()
        vol.healthy.clear()
        self.seconds_writing += time.perf_counter() - start
        self.n_written += 1


# ------------------------------------------------------------------------------------------
# 4-5. NIfTI
# ------------------------------------------------------------------------------------------
def write_nifti_outputs(vol: Volume, preprocessing: Preprocessing, stem: Path) -> tuple[str, str]:
    """The volume's map (and translation, when the method gives one) as NIfTI on the input's grid."""
    import nibabel as nib

    path = vol.files[0]
    original = nib.load(path)
    canonical = nib.as_closest_canonical(original)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))
    data = data.reshape(data.shape[:3])  # trailing axes of length 1 (io.read_nifti drops them too)
    lo, hi = float(data.min()), float(data.max())
    scale = hi - lo if hi - lo >= 1e-12 else 0.0
    # the slices as io.read_nifti shows them: radiological view [rows, columns] = canonical[::-1, ::-1, k].T
    height, width = data.shape[1], data.shape[0]
    anomaly = np.zeros(data.shape, np.float32)
    healthy = data.copy() if vol.healthy else None
    for key in vol.keys:
        k = key[1]
        view = slice_to_grid(vol.maps[key], preprocessing, (height, width), 0.0)
        anomaly[:, :, k] = view.T[::-1, ::-1]
        if healthy is not None:
            scan_view = ((data[::-1, ::-1, k].T - lo) / scale) if scale else np.zeros((height, width), np.float32)
            translated = slice_to_grid(vol.healthy[key], preprocessing, (height, width), scan_view)
            healthy[:, :, k] = (lo + translated * scale).T[::-1, ::-1]

    # canonical (RAS+) -> the file's own orientation
    to_original = nib.orientations.ornt_transform(nib.io_orientation(canonical.affine), nib.io_orientation(original.affine))
    out_paths = []
    for values, suffix in ((anomaly, MAP_SUFFIX), (healthy, HEALTHY_SUFFIX)):
        if values is None:
            out_paths.append("")
            continue
        img = nib.Nifti1Image(values, canonical.affine).as_reoriented(to_original)
        if not np.allclose(img.affine, original.affine, atol=1e-5):
            raise ScanomalyError(f"{path}: the map's affine does not come back to the input's (internal error)")
        header = original.header.copy()
        header.set_data_dtype(np.float32)
        out_values = np.asarray(img.dataobj, dtype=np.float32).reshape(original.shape)
        out = nib.Nifti1Image(out_values, original.affine, header)
        out.header.set_slope_inter(1.0, 0.0)
        if hasattr(original, "get_qform"):
            out.set_qform(original.get_qform(), int(original.header["qform_code"]))
            out.set_sform(original.get_sform(), int(original.header["sform_code"]))
        target = stem.with_name(stem.name + suffix + ".nii.gz")
        partial = stem.with_name(stem.name + suffix + ".partial.nii.gz")
        nib.save(out, str(partial))
        partial.replace(target)
        out_paths.append(str(target))
    return out_paths[0], out_paths[1]


# ------------------------------------------------------------------------------------------
# 4-5. DICOM: a Parametric Map referencing the source series
# ------------------------------------------------------------------------------------------
UINT16_MAX = 65535


def map_rescale(values: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) that store `values` in uint16: value = slope * stored + intercept."""
    lo, hi = float(values.min()), float(values.max())
    return ((hi - lo) / UINT16_MAX if hi > lo else 1.0), lo


def write_dicom_parametric_map(vol: Volume, preprocessing: Preprocessing, stem: Path, method: str) -> tuple[str, str]:
    hd = _highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    from . import __version__

    sources = [pydicom.dcmread(p) for p in vol.files]
    frames = np.stack([slice_to_grid(vol.maps[k], preprocessing, (int(ds.Rows), int(ds.Columns)), 0.0)
                       for k, ds in zip(vol.keys, sources)])
    slope, intercept = map_rescale(frames)
    stored = np.clip(np.round((frames - intercept) / slope), 0, UINT16_MAX).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly",
        lut_explanation=f"{method} anomaly map"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, UINT16_MAX),
        slope=slope,
        intercept=intercept,
    )
    center = float(stored.mean()) if stored.size else UINT16_MAX / 2
    pmap = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=stored,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="scanomaly",
        manufacturer_model_name=method[:64],
        software_versions=__version__,
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=center, window_width=float(UINT16_MAX))],
        content_label="ANOMALY",
        content_description=f"{method} anomaly map"[:64],
    )
    target = stem.with_name(stem.name + MAP_SUFFIX + ".dcm")
    partial = stem.with_name(stem.name + MAP_SUFFIX + ".partial.dcm")
    pmap.save_as(str(partial))
    partial.replace(target)
    return str(target), ""


def _highdicom():
    try:
        import highdicom as hd
    except ImportError:
        raise ScanomalyError("writing DICOM maps needs highdicom: pip install 'scanomaly[dicom-out]'") from None
    return hd


# ------------------------------------------------------------------------------------------
# 4-5. DICOM: a Secondary Capture series of the scan with the map in colour
# ------------------------------------------------------------------------------------------
OVERLAY_COLORMAP = "jet"  # as the heatmap panels (viz.heatmap_panel)
OVERLAY_OPACITY = 0.6  # of the colour where the map is at the top of its scale; 0 at the bottom
SCAN_PERCENTILES = (0.5, 99.5)  # the scan's grey levels stretched between these, over the series


def blend_overlay(scan01: np.ndarray, values: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """[H, W] scan in [0, 1] and [H, W] map -> [H, W, 3] uint8: the map's colour over the scan, with an
    opacity that grows with the map (OVERLAY_OPACITY at the top of `scale`), so low values leave the scan grey."""
    from matplotlib import colormaps

    lo, hi = scale
    t = np.clip((np.asarray(values, np.float64) - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    colour = colormaps[OVERLAY_COLORMAP](t)[..., :3]
    alpha = (OVERLAY_OPACITY * t)[..., None]
    rgb = (1.0 - alpha) * np.asarray(scan01, np.float64)[..., None] + alpha * colour
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _patient_orientation(hd, source) -> tuple:
    """The patient directions (e.g. L, P) closest to the rows and columns of `source` (made exactly orthogonal
    first: stored direction cosines are rounded)."""
    orientation = np.asarray([float(v) for v in source.ImageOrientationPatient])
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    column = orientation[3:] - np.dot(orientation[3:], row) * row
    column /= np.linalg.norm(column)
    axes = np.column_stack([row, column, np.cross(row, column)])
    row_direction, column_direction, _ = hd.spatial.get_closest_patient_orientation(axes)
    return row_direction.value, column_direction.value


def write_dicom_overlay(vol: Volume, preprocessing: Preprocessing, stem: Path, method: str,
                        scale: tuple[float, float] | None = None) -> str:
    """The series as RGB Secondary Capture images (`stem`_overlay/0001.dcm, ...: one per source slice, in
    slice order), in the source's study, each referencing its source image. `scale`: the colour scale
    (default: the series' maps, their minimum to their 99.5th percentile). Returns the folder."""
    hd = _highdicom()
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    from . import __version__

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in vol.files]
    scans = [read_image(p)[0] for p in vol.files]  # [0, 1], as the model's reader windows them
    frames = [slice_to_grid(vol.maps[k], preprocessing, scan.shape, 0.0) for k, scan in zip(vol.keys, scans)]
    if scale is None:
        stacked = np.stack(frames)
        scale = (float(stacked.min()), float(np.percentile(stacked, HEATMAP_PERCENTILE)))
    grey_lo, grey_hi = np.percentile(np.concatenate([s.ravel() for s in scans]), SCAN_PERCENTILES)
    grey_span = grey_hi - grey_lo if grey_hi > grey_lo else 1.0

    target = stem.with_name(stem.name + OVERLAY_SUFFIX)
    partial = stem.with_name(stem.name + OVERLAY_SUFFIX + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    series_uid = hd.UID()
    for number, (source, scan, values) in enumerate(zip(sources, scans, frames), start=1):
        row_direction, column_direction = _patient_orientation(hd, source)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=blend_overlay(np.clip((scan - grey_lo) / grey_span, 0, 1), values, scale),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=int(getattr(source, "SeriesNumber", 0) or 0) + 950,
            sop_instance_uid=hd.UID(),
            instance_number=number,
            manufacturer="scanomaly",
            pixel_spacing=tuple(float(v) for v in source.PixelSpacing),
            patient_orientation=(row_direction, column_direction),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{method} anomaly overlay"[:64],
            manufacturer_model_name=method[:64],
            software_versions=__version__,
        )
        image.ReferencedImageSequence = hd.ReferencedImageSequence(referenced_images=[source])
        image.save_as(str(partial / f"{number:04d}.dcm"))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return str(target)


# ------------------------------------------------------------------------------------------
# 6. one score per volume
# ------------------------------------------------------------------------------------------
def volume_scores_path(out_csv) -> Path:
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + "_volumes.csv")


def _slice_scores(out_csv: Path) -> dict[tuple, float]:
    with open(out_csv, newline="") as fh:
        return {record_key(r["path"], int(r["index"]) if r["index"] else None): float(r["score"])
                for r in csv.DictReader(fh)}


def write_volume_scores(volumes: list[Volume], out_csv) -> Path:
    """`<stem>_volumes.csv`: one row per volume with its slices' mean, max and top-k mean score."""
    scores = _slice_scores(Path(out_csv))
    ids, values, labels = [], [], []
    for position, vol in enumerate(volumes):
        for key in vol.keys:
            if key in scores:
                ids.append(f"{position:06d}")
                values.append(scores[key])
                labels.append(vol.label)
    reduced = {}
    if ids:
        for rule in ("mean", "max", "topk_mean"):
            s, y, pids = patient_scores(values, ids, labels, reduce=rule, k=TOP_K)
            reduced[rule] = {p: (float(v), int(lab)) for p, v, lab in zip(pids, s, y)}
    path = volume_scores_path(out_csv)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(VOLUME_COLUMNS)
        for position, vol in enumerate(volumes):
            pid = f"{position:06d}"
            if pid not in reduced.get("mean", {}):
                continue  # no slice of it could be scored
            label = reduced["mean"][pid][1]
            map_path, healthy_path = vol.outputs or ("", "")
            w.writerow([vol.files[0] if vol.kind == "nifti" else vol.name, vol.kind,
                        sum(k in scores for k in vol.keys), repr(reduced["mean"][pid][0]),
                        repr(reduced["max"][pid][0]), repr(reduced["topk_mean"][pid][0]),
                        "" if label < 0 else label, map_path, healthy_path, vol.overlay])
    return path
