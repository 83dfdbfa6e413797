"""Runs that cannot mix, and files tied to the weights they came from.

A run folder (`scanomaly train ... --out RUN`) records what makes it the run it is in `run.json`:
the data (every record's path, label and file size), the split (its parameters and the role of every
record), the options (method, profile, config, preprocessing, precision) and the code version.
Training into a folder that holds a run continues it only when all four are the same; anything else
is refused with a message naming what differs, or starts afresh with `--overwrite`.

Files derived from a model carry the checksum of the weights they came from, and are not used with
other weights:

- `model.json` records the SHA-256 of `model.safetensors` and of its own contents; `Detector.load`
  verifies both, so a damaged or edited model is an error, not a different model.
- `model.onnx` records the same weights checksum in its metadata; scoring with `--runtime onnx`
  refuses an export of other weights than the model folder's.
- a scores CSV has a `<stem>_source.json` beside it naming the model and its weights checksum; a
  resumed `score` refuses to append another model's scores to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

from .errors import ScanomalyError

RUN_FILE = "run.json"
# files whose presence marks a folder as a scanomaly run (an older one may lack run.json)
RUN_MARKERS = ("run.json", "train_summary.json", "result.json", "checkpoint.pt", "split.csv", "model/model.json",
               "train/checkpoint.pt", "stage1/checkpoint.pt")
WEIGHTS_KEY = "weights_sha256"
META_KEY = "meta_sha256"


# ------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def meta_checksum(meta: dict) -> str:
    """The checksum of model.json's contents, without the checksum entries themselves."""
    return sha256_bytes(_canonical({k: v for k, v in meta.items() if k not in (WEIGHTS_KEY, META_KEY)}))


def write_weights(tensors: dict, path: Path) -> str:
    """Write tensors as safetensors with ordinary file permissions (as any file this process writes,
    following the umask), and return the SHA-256 of the bytes written."""
    from safetensors.torch import save

    data = save(tensors)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return sha256_bytes(data)


def seal_meta(meta: dict, weights_sha256: str) -> dict:
    """model.json's contents with the weights checksum and its own checksum added."""
    meta = {**meta, WEIGHTS_KEY: weights_sha256}
    meta[META_KEY] = meta_checksum(meta)
    return meta


def verify_model(directory: Path, meta: dict, meta_path: Path, weights_path: Path) -> str:
    """Check model.json and model.safetensors against the checksums model.json records; return the
    weights file's checksum (for a model saved without checksums too, with a warning that it is unverified)."""
    recorded = meta.get(WEIGHTS_KEY)
    if recorded is None:
        warnings.warn(f"{meta_path} records no weights checksum (saved by an older scanomaly): the weights "
                      "cannot be verified; save the model again to add one")
        return sha256_file(weights_path)
    if META_KEY in meta and meta[META_KEY] != meta_checksum(meta):
        raise ScanomalyError(f"{meta_path}: the file was changed after the model was saved (its contents no longer "
                             "match the checksum it records); restore it or train again")
    actual = sha256_file(weights_path)
    if actual != recorded:
        raise ScanomalyError(f"{weights_path}: the weights are not the ones saved with this model (SHA-256 "
                             f"{actual[:12]}..., {meta_path.name} records {recorded[:12]}...): the file is damaged "
                             "or was replaced; restore it or train again")
    return recorded


def describe_load_failure(path: Path, exc: BaseException) -> ScanomalyError:
    """A model file that cannot be turned into a detector: one line naming the file."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
    if isinstance(exc, KeyError):
        text = f"missing entry {text}"
    return ScanomalyError(f"{path}: cannot load the model ({exc.__class__.__name__}: {text[:300]})")


# ------------------------------------------------------------------------------------------
# fingerprints of a training run
# ------------------------------------------------------------------------------------------
def code_version() -> str:
    """The package version and a digest of its source files: a code change is a different run."""
    from . import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def records_digest(records) -> str:
    """Every record's path, index, label, split, patient id and file size: the data a run saw."""
    rows = []
    for r in records:
        try:
            size = os.path.getsize(r.path)
        except OSError:
            size = -1
        rows.append([os.path.abspath(r.path), r.index, r.label, r.split, r.patient_id, r.mask_path, size])
    rows.sort(key=lambda row: json.dumps(row, default=str))
    return sha256_bytes(_canonical(rows))[:16]


def split_digest(split) -> str:
    """The role of every record in a HealthyGAN split."""
    from .splits import ROLES

    rows = sorted([role, os.path.abspath(r.path), r.index] for role in ROLES for r in getattr(split, role))
    return sha256_bytes(_canonical(rows))[:16]


def train_fingerprint(*, data: dict, split: dict | None, options: dict) -> dict:
    return {"data": data, "split": split, "options": options, "code": code_version()}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if old != new:
        return [f"{prefix}: {old!r} before, {new!r} now"]
    return []


def differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, one line each (JSON-normalised: tuples read as lists)."""
    return _differences(json.loads(json.dumps(recorded, default=str)), json.loads(json.dumps(current, default=str)))


def is_run_folder(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def prepare_run(run: Path, fingerprint: dict, overwrite: bool = False, write: bool = True) -> bool:
    """Make `run` ready for a training run with `fingerprint`, before anything is written to it.

    - no folder, or an empty one: it is (created and) given run.json;
    - a folder that holds the same run (run.json equal): it is resumed;
    - a folder that holds another run: refused, naming what differs, unless `overwrite`, which
      removes that run first;
    - a folder of other files: refused (a run is not mixed into unrelated files).

    With `write=False` (the other ranks of a distributed run) it does nothing: rank 0 checks and
    prepares, and if it refuses, torchrun stops the other ranks too.
    Returns True when this call created the folder (so a run that fails before it has anything
    worth resuming can remove it again: `discard_unused`)."""
    run = Path(run)
    created = False
    if not write:
        return False
    if run.exists() and not run.is_dir():
        raise ScanomalyError(f"{run}: exists and is not a folder; give a folder for --out")
    if run.is_dir() and any(run.iterdir()):
        if not is_run_folder(run):
            raise ScanomalyError(f"{run}: the folder holds other files and no scanomaly run; give a new or empty --out")
        if overwrite:
            shutil.rmtree(run)
        else:
            recorded_path = run / RUN_FILE
            if not recorded_path.is_file():
                raise ScanomalyError(f"{run}: holds a run that records no fingerprint (made by an older scanomaly), so it "
                                     "cannot be checked to be this run; use --overwrite to start afresh, or another --out")
            try:
                recorded = json.loads(recorded_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ScanomalyError(f"{recorded_path}: unreadable ({exc}); use --overwrite to start afresh") from None
            diffs = differences(recorded, fingerprint)
            if diffs:
                shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                raise ScanomalyError(f"{run} holds another run, and resuming it would mix the two ({shown}); "
                                     "use --overwrite to start afresh, or another --out")
            return False
    if not run.exists():
        created = True
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_FILE).write_text(json.dumps(fingerprint, indent=2, default=str) + "\n")
    return created


def discard_unused(run: Path, created: bool) -> None:
    """After a failed training run: remove the folder this run created if nothing in it is worth resuming
    (no checkpoint, no model), so that a failure leaves no empty or half-made --out behind."""
    run = Path(run)
    if not created or not run.is_dir():
        return
    if not (run / "model").exists() and not any(run.rglob("checkpoint.pt")):
        shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# scorers and what they write
# ------------------------------------------------------------------------------------------
def scorer_weights(scorer) -> str | None:
    """The weights checksum of a Detector (loaded or in memory) or of an ONNX export."""
    metadata = getattr(scorer, "metadata", None)
    if isinstance(metadata, dict):  # export.OnnxScorer
        return metadata.get(WEIGHTS_KEY)
    recorded = getattr(scorer, "weights_sha256", None)
    if recorded:
        return recorded
    return state_checksum(scorer) if hasattr(scorer, "state_tensors") else None


def state_checksum(detector) -> str:
    """The checksum `Detector.save` would record for the detector's current weights."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_tensors().items()}
    return sha256_bytes(save(tensors))


def check_onnx_matches_model(onnx_path: Path, onnx_metadata: dict) -> None:
    """An ONNX file in (or beside) a model folder must have been exported from that folder's weights."""
    onnx_path = Path(onnx_path)
    weights = onnx_path.parent / "model.safetensors"
    if not weights.is_file():
        return  # a bare .onnx file: nothing to compare it with
    model_weights = sha256_file(weights)
    exported = onnx_metadata.get(WEIGHTS_KEY)
    if model_weights is None or exported != model_weights:
        raise ScanomalyError(
            f"{onnx_path} was not exported from the weights now in {onnx_path.parent} "
            f"({'no weights checksum in the export' if exported is None else 'the weights changed since'}): "
            f"it would score with another network; export again: scanomaly export {onnx_path.parent} --format onnx")


def drop_stale_exports(model_dir: Path, exports=("model.onnx",)) -> None:
    """Before new weights are saved into a model folder: remove exports made from the old ones."""
    for name in exports:
        (Path(model_dir) / name).unlink(missing_ok=True)


def scorer_source(scorer) -> dict:
    """What a scores CSV records about the model that wrote it."""
    where = getattr(scorer, "model_dir", None) or getattr(scorer, "path", None)
    return {"model": None if where is None else str(where), "method": getattr(scorer, "name", None),
            "runtime": "onnx" if isinstance(getattr(scorer, "metadata", None), dict) else "torch",
            WEIGHTS_KEY: scorer_weights(scorer)}


def drop_heatmap_panels(heatmap_dir) -> None:
    """`score --overwrite`: the panels of the earlier run go with its CSV (names as streaming writes them)."""
    import re

    if heatmap_dir is None or not Path(heatmap_dir).is_dir():
        return
    for p in Path(heatmap_dir).glob("*.png"):
        if re.fullmatch(r"\d{5}_.*\.png", p.name):
            p.unlink()


def scores_source_path(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.stem + "_source.json")


def check_scores_source(out_csv: Path, source: dict, resuming: bool) -> None:
    """Scores appended to an existing CSV must come from the same model (weights checksum). Writes the
    record on a fresh CSV."""
    path = scores_source_path(out_csv)
    if resuming and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if None not in (recorded.get(WEIGHTS_KEY), source.get(WEIGHTS_KEY)) and recorded[WEIGHTS_KEY] != source[WEIGHTS_KEY]:
            raise ScanomalyError(
                f"{out_csv} holds scores of another model ({recorded.get('model')}, weights "
                f"{str(recorded.get(WEIGHTS_KEY))[:12]}...; this one: {source.get('model')}, weights "
                f"{str(source.get(WEIGHTS_KEY))[:12]}...); appending would mix them: use --overwrite or another --out")
        return
    if resuming:
        warnings.warn(f"{out_csv}: resuming a scores file that does not record which model wrote it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(source, indent=2, default=str) + "\n")


def read_scores_source(scores_csv) -> dict | None:
    path = scores_source_path(Path(scores_csv))
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def training_records_of(scores_csv) -> tuple[Path, set] | None:
    """(split.csv, record keys of the images its model trained on) for a scores CSV whose source
    record names a model in a run folder with a split.csv; None when unknown."""
    from .scores_csv import record_key
    from .splits import read_split_manifest

    source = read_scores_source(scores_csv)
    model = (source or {}).get("model")
    if not model:
        return None
    model = Path(model)
    if model.suffix == ".onnx":  # an export: its model folder
        model = model.parent
    for split_csv in (model.parent / "split.csv", model / "split.csv"):
        if split_csv.is_file():
            try:
                split = read_split_manifest(split_csv)
            except ScanomalyError:
                return None
            keys = {record_key(r.path, r.index) for role in ("healthy", "unlabeled") for r in getattr(split, role)}
            return split_csv, keys
    return None


# ------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------
def require_labels(records, source, what: str) -> None:
    """Where labels are needed: an error when none of the records has one (e.g. a manifest without
    a `label` column), instead of treating every image as unknown."""
    from .data import UNKNOWN

    if records and all(r.label == UNKNOWN for r in records):
        raise ScanomalyError(f"{source}: no image has a label (a manifest needs a 'label' column of normal/abnormal "
                             f"or 0/1; a folder needs normal/ and abnormal/ subfolders); {what} needs labels")


def warn_if_unlabeled_manifest(source) -> None:
    """On `score`: a manifest without a `label` column scores fine, but its images are all "unknown", so
    the scores CSV cannot be evaluated without labels from elsewhere: say so."""
    import csv

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        try:
            with open(source, newline="") as fh:
                columns = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return
        if "label" not in [c.strip() for c in columns] and "role" not in columns:
            warnings.warn(f"{source} has no 'label' column: every image is scored as label unknown "
                          "(give labels to `evaluate` with --labels CSV or --data DIR)")


# ------------------------------------------------------------------------------------------
# evaluate: numbers that look right and are not
# ------------------------------------------------------------------------------------------
def evaluation_warnings(scores_csv, rows: list[dict], auroc: float | None) -> list[str]:
    """Warnings for `evaluate`: scored images the model trained on (from its run's split.csv, found
    through the scores CSV's source record), and an AUROC below 0.5."""
    from .scores_csv import record_key

    out = []
    trained = training_records_of(scores_csv)
    if trained is not None:
        split_csv, keys = trained
        n = sum(record_key(r["path"], r["index"]) in keys for r in rows)
        if n:
            out.append(f"{n} of the {len(rows)} scored image(s) were in the model's training roles (healthy or "
                       f"unlabeled in {split_csv}): their scores say how well it fits its training data, not how it "
                       "detects disease; evaluate on the test role (score --role test)")
    if auroc is not None and auroc == auroc and auroc < 0.5:
        out.append(f"AUROC {auroc:.3f} is below 0.5: the scores rank abnormal images as more normal than normal ones; "
                   "are the scores or the labels inverted?")
    return out


# ------------------------------------------------------------------------------------------
# report: a run folder made by `train`
# ------------------------------------------------------------------------------------------
def train_run_result(run_dir, n_bootstrap: int = 1000) -> dict:
    """A result (as `benchmark.run_method` writes result.json) for a run folder made by `train`, from its
    train_summary.json, the test scores scored into it and its validation scores (for the thresholds)."""
    from .pipeline import _evaluate_rules
    from .scores_csv import read_scores_csv

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    test_csv = run_dir / "test_scores.csv"
    if not test_csv.is_file():
        split = run_dir / "split.csv"
        how = (f"scanomaly score {run_dir} {split} --role test --out {test_csv}" if split.is_file()
               else f"scanomaly score {run_dir} TEST_IMAGES --out {test_csv}")
        raise ScanomalyError(f"{run_dir}: a run made by `train` holds no test scores yet, and the report shows test "
                             f"results; score the test images into it first: {how}")
    rows = [r for r in read_scores_csv(test_csv) if r["label"] is not None]
    if not rows or len({r["label"] for r in rows}) < 2:
        raise ScanomalyError(f"{test_csv}: the report needs labeled normal and abnormal test images")
    import numpy as np

    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["score"] for r in rows])
    val_labels = val_scores = None
    if (run_dir / "val_scores.csv").is_file():
        val = [r for r in read_scores_csv(run_dir / "val_scores.csv") if r["label"] is not None]
        if len({r["label"] for r in val}) == 2:
            val_labels, val_scores = np.array([r["label"] for r in val]), np.array([r["score"] for r in val])
    seed = int(summary.get("config", {}).get("seed", 0) or 0)
    data = summary.get("data", {})
    return {
        "method": summary.get("method"),
        "profile": summary.get("profile"),
        "seed": seed,
        "split_seed": seed if data.get("from_labeled") else None,
        "data": data.get("from_labeled") or data.get("healthy"),
        "precision": summary.get("precision"),
        "device": summary.get("device"),
        "image_size": summary.get("preprocessing", {}).get("image_size"),
        "preprocessing": summary.get("preprocessing"),
        "split": summary.get("split"),
        "train_seconds": summary.get("seconds"),
        "test": _evaluate_rules(labels, scores, val_labels, val_scores, seed, n_bootstrap),
    }
