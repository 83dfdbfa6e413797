"""No silent wrong answers: runs that cannot mix, models and inputs that are checked, threads chosen
deliberately. Through the CLI (cli.main), with a tiny fake method registered only in this module."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanomaly import runs, threads
from scanomaly.cli import main
from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.io import MIN_IMAGE_SIDE, read_image

from conftest import MeanConfig, MeanDetector, registered


@dataclass
class SafetyConfig(MeanConfig):
    lr: float = 0.1  # a float option for the option checks
    fail: bool = False  # make `fit` fail, as a crashed training would


class SafetyDetector(MeanDetector):
    """conftest's fake method, recording the threads it trained with, and able to fail on purpose."""

    name = "_safety_mean"
    Config = SafetyConfig
    profiles = {"cpu": {"preprocessing": {"image_size": 16}}}
    fit_threads: list = []

    def fit(self, healthy, unlabeled=None, **kwargs):
        import torch

        SafetyDetector.fit_threads.append(torch.get_num_threads())
        if self.config.fail:
            raise ScanomalyError("training failed on purpose")
        return super().fit(healthy, unlabeled, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def fake_method():
    with registered(SafetyDetector):
        yield


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def train(capsys, data, out, *extra, source="--from-labeled"):
    return cli(capsys, "train", "_safety_mean", source, data, "--out", out, "--no-progress", "--device", "cpu", *extra)


def roles(run: Path) -> dict[str, str]:
    with open(run / "split.csv", newline="") as fh:
        return {row["path"]: row["role"] for row in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------
# runs that cannot mix
# ------------------------------------------------------------------------------------------
def test_a_run_resumes_only_itself_and_overwrite_starts_afresh(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(capsys, tiny_tree, run, "--seed", 0)
    assert code == 0, err
    first_roles, first_weights = roles(run), (run / "model" / "model.safetensors").read_bytes()
    assert json.loads((run / "run.json").read_text())["options"]["config"]["seed"] == 0

    # the same command continues the same run
    code, _, err = train(capsys, tiny_tree, run, "--seed", 0)
    assert code == 0, err

    # another seed (another split, another model): refused, naming what differs, and nothing is touched
    code, _, err = train(capsys, tiny_tree, run, "--seed", 1)
    assert code == 2 and "options.config.seed: 0 before, 1 now" in err and "--overwrite" in err
    assert roles(run) == first_roles and (run / "model" / "model.safetensors").read_bytes() == first_weights
    # another option, another split fraction: refused too
    code, _, err = train(capsys, tiny_tree, run, "--seed", 0, "--set", "lr=0.5")
    assert code == 2 and "options.config.lr" in err
    code, _, err = train(capsys, tiny_tree, run, "--seed", 0, "--abnormal-fraction", 0.2)
    assert code == 2 and "split.options.abnormal_fraction" in err

    # --overwrite: a fresh run whose files all belong to it
    code, _, err = train(capsys, tiny_tree, run, "--seed", 1, "--overwrite")
    assert code == 0, err
    assert roles(run) != first_roles
    assert json.loads((run / "train_summary.json").read_text())["config"]["seed"] == 1
    assert json.loads((run / "run.json").read_text())["options"]["config"]["seed"] == 1
    assert (run / "model" / "model.safetensors").read_bytes() != first_weights


def test_other_data_or_code_is_another_run(tiny_tree, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")[0] == 0
    shutil.copy(tiny_tree / "train" / "normal" / "normal_00.png", tiny_tree / "train" / "normal" / "normal_99.png")
    code, _, err = train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")
    assert code == 2 and "data.records" in err
    (tiny_tree / "train" / "normal" / "normal_99.png").unlink()
    monkeypatch.setattr(runs, "code_version", lambda: "0.0.0+other")
    code, _, err = train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")
    assert code == 2 and "code:" in err


def test_folders_that_cannot_be_checked_are_refused(tiny_tree, tmp_path, capsys):
    old = tmp_path / "old"  # a run made before fingerprints
    assert train(capsys, tiny_tree, old)[0] == 0
    (old / "run.json").unlink()
    code, _, err = train(capsys, tiny_tree, old)
    assert code == 2 and "no fingerprint" in err
    assert train(capsys, tiny_tree, old, "--overwrite")[0] == 0

    other = tmp_path / "papers"  # somebody's folder
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = train(capsys, tiny_tree, other, "--overwrite")
    assert code == 2 and "other files" in err and (other / "notes.txt").read_text() == "keep me"


def test_a_failed_train_leaves_no_out_folder(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(capsys, tiny_tree, run, "--set", "fail=true")
    assert code == 2 and "on purpose" in err
    assert not run.exists()
    # a folder the user made stays, empty as it was
    run.mkdir()
    assert train(capsys, tiny_tree, run, "--set", "fail=true")[0] == 2
    assert run.is_dir()


@pytest.mark.parametrize("options, message", [
    (["--set", "iterations=five"], "'iterations' must be an integer"),
    (["--set", "lr=abc"], "'lr' must be a number"),
    (["--set", "lr=0"], "'lr' must be positive"),
    (["--iters", "0"], "'iterations' must be at least 1"),
    (["--batch-size", "0"], "'batch_size' must be at least 1"),
    (["--image-size", "4"], "image_size must be at least 8"),
    (["--set", "center_crop=maybe"], "'center_crop' must be true/false"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--holdout-fraction", "1.5"], "holdout_fraction"),
])
def test_every_option_is_checked_before_any_file_is_written(tiny_tree, tmp_path, capsys, options, message):
    run = tmp_path / "run"
    code, _, err = train(capsys, tiny_tree, run, *options)
    assert code == 2 and err.startswith("error:") and message in err, err
    assert not run.exists()


def test_a_network_that_cannot_take_the_image_size_is_an_error(tiny_tree, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "fanogan", "--healthy", tiny_tree / "train" / "normal", "--image-size", 50,
                       "--profile", "tiny", "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "image size 50" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# models that are checked
# ------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")[0] == 0
    return run / "model"


def _strip_checksums(model: Path) -> dict:
    meta = json.loads((model / "model.json").read_text())
    meta.pop(runs.WEIGHTS_KEY)
    meta.pop(runs.META_KEY)
    (model / "model.json").write_text(json.dumps(meta))
    return meta


def test_model_json_records_checksums_and_the_weights_are_readable_by_all(model_dir):
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta[runs.WEIGHTS_KEY] == runs.sha256_file(model_dir / "model.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def _flip_a_byte(model):
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))


def _edit_config(model):
    meta = json.loads((model / "model.json").read_text())
    meta["config"]["seed"] = 7
    (model / "model.json").write_text(json.dumps(meta))


def _drop_method(model):
    meta = json.loads((model / "model.json").read_text())
    del meta["method"]
    (model / "model.json").write_text(json.dumps(meta))


def _truncate(model):
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:40])


def _empty(model):
    (model / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("damage, file, message", [
    (_flip_a_byte, "model.safetensors", "not the ones saved"),
    (_edit_config, "model.json", "changed after the model was saved"),
    (_drop_method, "model.json", "no 'method'"),
    (_truncate, "model.safetensors", "not the ones saved"),
    (_empty, "model.safetensors", "not the ones saved"),
])
def test_a_damaged_model_is_an_error_naming_the_file(model_dir, tiny_tree, tmp_path, capsys, damage, file, message):
    damage(model_dir)
    code, _, err = cli(capsys, "score", model_dir, tiny_tree / "test", "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 2 and err.startswith("error:") and str(model_dir / file) in err and message in err, err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("damage, file", [(_truncate, "model.safetensors"), (_empty, "model.safetensors"),
                                          (_drop_method, "model.json")])
def test_a_damaged_model_without_checksums_is_an_error_too(model_dir, tmp_path, capsys, damage, file):
    _strip_checksums(model_dir)  # as saved by an older scanomaly
    damage(model_dir)
    code, _, err = cli(capsys, "score", model_dir, model_dir.parent, "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 2 and str(model_dir / file) in err, err


@pytest.fixture(scope="module")
def fanogan_model(tmp_path_factory):
    """A tiny trained exportable model, and its ingredients."""
    from conftest import make_tiny_tree

    root = tmp_path_factory.mktemp("fanogan")
    data = make_tiny_tree(root / "data", n=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "scanomaly", "train", "fanogan", "--healthy", str(data / "train" / "normal"),
                    "--profile", "tiny", "--iters", "2", "--out", str(root / "run"), "--no-progress"],
                   check=True, env=env, capture_output=True)
    return root / "run" / "model", data


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["config"].__setitem__("width", 8), "size mismatch"),  # tensors of another shape
    (lambda m: m["preprocessing"].__setitem__("image_size", 50), "image size 50"),  # a size the network cannot take
])
def test_an_old_model_whose_config_cannot_hold_its_weights_is_an_error(fanogan_model, tmp_path, capsys, edit, message):
    source, data = fanogan_model
    model = tmp_path / "model"
    shutil.copytree(source, model)
    meta = _strip_checksums(model)
    edit(meta)
    (model / "model.json").write_text(json.dumps(meta))
    code, _, err = cli(capsys, "score", model, data / "test", "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 2 and "\nerror: " in err and str(model) in err and message in err, err


def test_an_export_of_other_weights_is_never_used(fanogan_model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    source, data = fanogan_model
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(source, a)
    code, _, err = cli(capsys, "export", a)
    assert code == 0, err
    assert cli(capsys, "score", a, data / "test", "--runtime", "onnx", "--out", tmp_path / "a.csv", "--no-progress")[0] == 0

    # b: other weights (a retrain) beside a's export
    det = Detector.load(source)
    det.load_state_tensors({k: v + 0.01 for k, v in det.state_tensors().items()})
    det.save(b)
    shutil.copy(a / "model.onnx", b / "model.onnx")
    code, _, err = cli(capsys, "score", b, data / "test", "--runtime", "onnx", "--out", tmp_path / "b.csv", "--no-progress")
    assert code == 2 and "not exported from the weights now in" in err and "export again" in err

    # saving new weights into a model folder removes the export of the old ones
    det.save(a)
    assert not (a / "model.onnx").exists()


def test_a_scores_csv_is_never_resumed_with_another_model(tiny_tree, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(capsys, tiny_tree / "train" / "normal", one, "--seed", 0, source="--healthy")[0] == 0
    assert train(capsys, tiny_tree / "train" / "normal", two, "--seed", 3, source="--healthy")[0] == 0
    out = tmp_path / "s.csv"
    assert cli(capsys, "score", one, tiny_tree / "test" / "normal", "--out", out, "--no-progress")[0] == 0
    code, _, err = cli(capsys, "score", two, tiny_tree / "test", "--out", out, "--no-progress")
    assert code == 2 and "holds scores of another model" in err
    # the same model resumes; --overwrite starts over with the other one
    assert cli(capsys, "score", one, tiny_tree / "test", "--out", out, "--no-progress")[0] == 0
    assert cli(capsys, "score", two, tiny_tree / "test", "--out", out, "--no-progress", "--overwrite")[0] == 0
    assert json.loads(runs.scores_source_path(out).read_text())["model"] == str(two / "model")


# ------------------------------------------------------------------------------------------
# inputs that are checked
# ------------------------------------------------------------------------------------------
def test_an_image_below_the_minimum_size_is_skipped_with_its_reason(tiny_tree, tmp_path, capsys):
    folder = tiny_tree / "test" / "normal"
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(folder / "dot.png")
    Image.fromarray(np.full((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), 128, np.uint8)).save(folder / "small_ok.png")
    run = tmp_path / "run"
    assert train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")[0] == 0
    code, _, err = cli(capsys, "score", run, folder, "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 0, err
    with open(tmp_path / "s.csv", newline="") as fh:
        names = {row["name"] for row in csv.DictReader(fh)}
    assert "dot.png" not in names and "small_ok.png" in names
    assert "dot.png" in err and f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}" in err


def _dicom_8bit(path: Path, pixels: np.ndarray) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    import pydicom

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_the_same_pixels_as_png_and_as_dicom_without_a_window_score_the_same(tiny_tree, tmp_path, capsys):
    # a dim image (not spanning 0..255), where stretching to its own range would change it
    pixels = (40 + np.asarray(Image.open(tiny_tree / "test" / "abnormal" / "abnormal_00.png"), np.float32) * 0.5)
    pixels = pixels.round().astype(np.uint8)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(pixels).save(images / "scan.png")
    _dicom_8bit(images / "scan.dcm", pixels)
    (png,), (dcm,) = read_image(images / "scan.png"), read_image(images / "scan.dcm")
    np.testing.assert_array_equal(png, dcm)

    run = tmp_path / "run"
    assert train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")[0] == 0
    assert cli(capsys, "score", run, images, "--out", tmp_path / "s.csv", "--no-progress")[0] == 0
    with open(tmp_path / "s.csv", newline="") as fh:
        scores = {Path(row["path"]).suffix: float(row["score"]) for row in csv.DictReader(fh)}
    assert scores[".png"] == scores[".dcm"]


def _manifest_without_labels(tiny_tree, tmp_path) -> Path:
    manifest = tmp_path / "unlabeled.csv"
    files = sorted((tiny_tree / "test").rglob("*.png"))
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in files))
    return manifest


def test_a_manifest_without_labels_warns_on_score_and_is_an_error_where_labels_are_needed(tiny_tree, tmp_path, capsys):
    manifest = _manifest_without_labels(tiny_tree, tmp_path)
    run = tmp_path / "run"
    assert train(capsys, tiny_tree / "train" / "normal", run, source="--healthy")[0] == 0
    code, _, err = cli(capsys, "score", run, manifest, "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 0 and "no 'label' column" in err
    code, _, err = cli(capsys, "evaluate", tmp_path / "s.csv", "--labels", manifest)
    assert code == 2 and "no image has a label" in err
    code, _, err = train(capsys, manifest, tmp_path / "run2")
    assert code == 2 and "no image has a label" in err and not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------------------------
# evaluate: numbers that look right and are not
# ------------------------------------------------------------------------------------------
def test_evaluate_warns_about_training_images_and_an_inverted_auroc(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, tiny_tree, run, "--abnormal-fraction", 0.25)[0] == 0
    # the whole split, training roles included
    assert cli(capsys, "score", run, run / "split.csv", "--out", tmp_path / "all.csv", "--no-progress")[0] == 0
    code, _, err = cli(capsys, "evaluate", tmp_path / "all.csv", "--data", tiny_tree, "--n-bootstrap", 10)
    assert code == 0 and "training roles" in err
    # the test role only: no such warning
    assert cli(capsys, "score", run, run / "split.csv", "--role", "test", "--out", tmp_path / "t.csv",
               "--no-progress")[0] == 0
    code, _, err = cli(capsys, "evaluate", tmp_path / "t.csv", "--data", tiny_tree, "--n-bootstrap", 10)
    assert code == 0 and "training roles" not in err

    # inverted scores
    with open(tmp_path / "t.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "inv.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "score": -float(r["score"])} for r in rows)
    code, out, err = cli(capsys, "evaluate", tmp_path / "inv.csv", "--data", tiny_tree, "--n-bootstrap", 10)
    assert code == 0 and "below 0.5" in err and "inverted" in err


# ------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------
def test_threads_come_from_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    assert threads.available_cpus(affinity=8, quota=None) == 8
    assert threads.available_cpus(affinity=8, quota=2.5) == 2  # rounded down
    assert threads.available_cpus(affinity=2, quota=16.0) == 2
    assert threads.available_cpus(affinity=4, quota=0.5) == 1  # at least one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert threads.affinity_cpus() == 3

    # cgroup v2, this process in /job: cpu.max of its own cgroup
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (tmp_path / "v2" / "job").mkdir(parents=True)
    (tmp_path / "v2" / "job" / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "v2", proc) == 1.5
    (tmp_path / "v2" / "job" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "v2", proc) is None
    # cgroup v1
    proc.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    v1 = tmp_path / "v1" / "cpu,cpuacct" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "v1", proc) == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path / "v1", proc) is None

    # defaults: OMP_NUM_THREADS when set, else the cores; readers leave the model its cores
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}, affinity=8, quota=None) == 3
    assert threads.default_threads({}, affinity=8, quota=1.0) == 1
    assert threads.default_workers(affinity=1, quota=None) == 0
    assert threads.default_workers(affinity=2, quota=None) == 1
    assert threads.default_workers(affinity=16, quota=None) == 2


def test_importing_scanomaly_makes_openmp_wait_passively_unless_told_otherwise():
    code = "import os, scanomaly; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "ACTIVE"


def test_threads_option_sets_the_threads_training_uses(tiny_tree, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        SafetyDetector.fit_threads.clear()
        assert train(capsys, tiny_tree / "train" / "normal", tmp_path / "run", "--threads", 1, source="--healthy")[0] == 0
        assert SafetyDetector.fit_threads == [1]
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# report of a run made by `train`
# ------------------------------------------------------------------------------------------
def test_report_takes_a_run_folder_made_by_train(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(capsys, tiny_tree, run, "--holdout-fraction", 0.34)[0] == 0
    code, _, err = cli(capsys, "report", run)
    assert code == 2 and "--role test --out" in err  # says how to get the test scores it shows
    assert cli(capsys, "score", run, run / "split.csv", "--role", "test", "--out", run / "test_scores.csv",
               "--no-progress")[0] == 0
    code, out, err = cli(capsys, "report", run, "--gallery", 2)
    assert code == 0, err
    html = (run / "report.html").read_text()
    assert "_safety_mean" in html and "AUROC" in html
