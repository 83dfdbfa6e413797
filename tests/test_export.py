"""ONNX export: ONNX Runtime scores what PyTorch scores, on real chest X-rays, at any batch size;
the file carries its preprocessing; methods that cannot export say why."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from scanomaly import __version__, get_method, load_images  # noqa: E402
from scanomaly.cli import main  # noqa: E402
from scanomaly.errors import ScanomalyError  # noqa: E402
from scanomaly.export import OnnxScorer, export_onnx, find_onnx, read_onnx_metadata  # noqa: E402

# a few training steps each: the weights only need to be something other than their initialisation
BRIEF_FIT = {
    "healthygan": {"iterations": 4, "selection": "last"},
    "fanogan": {"iterations": 4, "encoder_iterations": 2},
    "ganomaly": {"iterations": 4},
    "alad": {"iterations": 4},
    "alocc": {"iterations": 4},
}
ATOL = 1e-4


@pytest.fixture(scope="module")
def chest(chest_slice):
    """Real chest X-rays, decoded once per preprocessing: {"train_normal", "train_abnormal", "test"} records."""
    cache = {}

    def images(preprocessing, part):
        records = {
            "train_normal": [r for r in chest_slice if r.split == "train" and r.label == 0],
            "train_abnormal": [r for r in chest_slice if r.split == "train" and r.label == 1],
            "test": [r for r in chest_slice if r.split == "test"],
        }[part]
        key = (preprocessing, part)
        if key not in cache:
            cache[key] = load_images(records, preprocessing, progress=False)
        return cache[key]

    return images


def fitted(method, chest, preprocessing_overrides=None):
    cls = get_method(method)
    det = cls.from_profile("tiny", BRIEF_FIT[method], preprocessing_overrides)
    prep = det.preprocessing
    unlabeled = chest(prep, "train_abnormal") if cls.needs_unlabeled else None
    return det.fit(chest(prep, "train_normal"), unlabeled, progress=False)


@pytest.mark.parametrize("method", sorted(BRIEF_FIT))
def test_onnx_runtime_scores_equal_pytorch_on_real_images(method, chest, tmp_path):
    det = fitted(method, chest)
    result = export_onnx(det, tmp_path / "model.onnx")
    assert result.path.is_file() and result.max_score_difference < ATOL

    test = chest(det.preprocessing, "test")  # 24 images
    scores, maps, reconstructions = det.score_and_reconstruct(test)
    onnx = OnnxScorer(result.path)
    # the batch axis is dynamic: batches of 24, then 5 (4 x 5 + 4), neither the traced size (2)
    for batch_size in (24, 5):
        o_scores, o_maps, o_reconstructions = onnx.score_and_reconstruct(test, batch_size=batch_size)
        assert o_scores.shape == scores.shape == (24,) and o_maps.shape == maps.shape == (24, 32, 32)
        np.testing.assert_allclose(o_scores, scores, rtol=0, atol=ATOL)
        np.testing.assert_allclose(o_maps, maps, rtol=0, atol=ATOL)
        np.testing.assert_allclose(o_reconstructions, reconstructions, rtol=0, atol=ATOL)
    assert np.ptp(scores) > 0  # real, different scores, not a constant that matches trivially


def test_exported_file_carries_its_preprocessing(chest, tmp_path):
    det = fitted("ganomaly", chest, {"top_crop": 0.08, "intensity": "percentile"})
    path = export_onnx(det, tmp_path / "ganomaly.onnx", opset=20).path
    meta = read_onnx_metadata(path)
    assert meta["method"] == "ganomaly" and meta["scanomaly_version"] == __version__ and meta["opset"] == 20
    assert meta["preprocessing"] == det.preprocessing.to_dict()
    assert meta["preprocessing"]["top_crop"] == 0.08 and meta["preprocessing"]["intensity"] == "percentile"
    assert meta["config"]["latent"] == 16
    scorer = OnnxScorer(path)
    assert scorer.preprocessing == det.preprocessing and scorer.name == "ganomaly"
    # read with the preprocessing it carries, the images score as in PyTorch
    test = chest(scorer.preprocessing, "test")
    np.testing.assert_allclose(scorer.score(test)[0], det.score(test)[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,reason", [
    ("anogan", "latent space"), ("padim", "Gaussians"), ("patchcore", "memory bank"),
])
def test_methods_without_one_forward_pass_say_they_do_not_export(method, reason, tmp_path):
    det = get_method(method).from_profile("tiny")
    with pytest.raises(ScanomalyError, match=f"{method} cannot be exported to ONNX: .*{reason}"):
        export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_opset_out_of_range_and_missing_export(chest, tmp_path):
    det = get_method("alocc").from_profile("tiny")
    with pytest.raises(ScanomalyError, match="opset"):
        export_onnx(det, tmp_path / "m.onnx", opset=21)
    with pytest.raises(ScanomalyError, match="scanomaly export"):
        find_onnx(tmp_path)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_export_then_score_with_onnx_runtime(chest, chest_slice, tmp_path, capsys):
    det = fitted("healthygan", chest)
    run_dir = tmp_path / "run"
    det.save(run_dir / "model")
    manifest = tmp_path / "test.csv"
    test = [r for r in chest_slice if r.split == "test"]
    manifest.write_text("path,label\n" + "".join(f"{r.path},{r.label}\n" for r in test))

    code, out, err = run(capsys, "score", run_dir, manifest, "--runtime", "onnx", "--out", tmp_path / "x.csv")
    assert code == 2 and "scanomaly export" in err  # nothing exported yet

    code, out, err = run(capsys, "export", run_dir, "--format", "onnx")
    assert code == 0, err
    assert (run_dir / "model" / "model.onnx").is_file() and "opset 18" in out

    common = ["--workers", 0, "--batch-size", 7, "--no-progress"]
    code, _, err = run(capsys, "score", run_dir, manifest, "--out", tmp_path / "torch.csv", "--device", "cpu", *common)
    assert code == 0, err
    code, out, err = run(capsys, "score", run_dir, manifest, "--runtime", "onnx", "--out", tmp_path / "onnx.csv", *common)
    assert code == 0, err
    assert "with healthygan (onnx" in out
    torch_rows, onnx_rows = read_rows(tmp_path / "torch.csv"), read_rows(tmp_path / "onnx.csv")
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows] and len(onnx_rows) == 24
    np.testing.assert_allclose([float(r["score"]) for r in onnx_rows], [float(r["score"]) for r in torch_rows],
                               rtol=0, atol=ATOL)

    # an .onnx file given directly works too, wherever it is
    code, _, err = run(capsys, "export", run_dir / "model", "--out", tmp_path / "elsewhere" / "hg.onnx", "--opset", 17)
    assert code == 0, err
    assert json.loads(OnnxScorer(tmp_path / "elsewhere" / "hg.onnx").session.get_modelmeta()
                      .custom_metadata_map["scanomaly"])["opset"] == 17
    code, _, err = run(capsys, "score", tmp_path / "elsewhere" / "hg.onnx", manifest, "--runtime", "onnx",
                       "--out", tmp_path / "file.csv", *common)
    assert code == 0, err
    assert len(read_rows(tmp_path / "file.csv")) == 24


def test_cli_export_of_a_search_method_is_a_clear_error(tmp_path, capsys):
    get_method("anogan").from_profile("tiny").save(tmp_path / "model")
    code, out, err = run(capsys, "export", tmp_path / "model", "--format", "onnx")
    assert code == 2 and err.startswith("error: anogan cannot be exported to ONNX") and "fanogan" in err
    assert not (tmp_path / "model" / "model.onnx").exists()


def test_compiled_scoring_equals_eager_scoring(chest, tmp_path):
    det = fitted("healthygan", chest)
    test = chest(det.preprocessing, "test")
    eager_scores, eager_maps = det.score(test, batch_size=8)
    det.save(tmp_path / "model")
    compiled = get_method("healthygan").load(tmp_path / "model").compile()
    scores, maps = compiled.score(test, batch_size=8)
    assert compiled._compiled_network is not None
    np.testing.assert_allclose(scores, eager_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps, eager_maps, atol=1e-4)


def test_compile_of_a_search_method_says_why_not(chest):
    det = get_method("anogan").from_profile("tiny")
    with pytest.raises(ScanomalyError, match="cannot be compiled"):
        det.compile()
