"""The local viewer at the HTTP level (Starlette's TestClient): rows sorted by score with paging and filters,
the ROC of labelled scores, pictures of a row and of other slices of its volume, uploads scored with the
source's model, uploads refused when too large or not images, and nothing written outside its folder."""

from __future__ import annotations

import io
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from scanomaly import get_method  # noqa: E402
from scanomaly.cli import main  # noqa: E402
from scanomaly.io import read_image  # noqa: E402
from scanomaly.streaming import score_stream  # noqa: E402
from scanomaly.viewer import build_app  # noqa: E402
from scanomaly.viewer.sources import find_sources  # noqa: E402

from conftest import make_tiny_tree  # noqa: E402


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A run-like folder: model/ and scores.csv of 6 labelled PNGs and the 6 slices of a NIfTI volume."""
    root = tmp_path_factory.mktemp("viewer")
    tree = make_tiny_tree(root / "tree", n=3)
    volume = np.random.default_rng(1).random((32, 32, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, 1.0, 2.0, 1.0])), str(root / "scan.nii.gz"))
    detector = get_method("ganomaly").from_profile("tiny")
    run = root / "run"
    detector.save(run / "model")
    from scanomaly import discover

    records = discover(tree / "test") + discover(root / "scan.nii.gz")
    score_stream(detector, records, run / "scores.csv", batch_size=8, workers=0, progress=False)
    return run, tree, detector


def snapshot(*folders) -> dict:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in f.rglob("*")}


@pytest.fixture
def client(scored, tmp_path):
    run, _, _ = scored
    app = build_app(run, workdir=tmp_path / "work", max_upload_bytes=200_000)
    with TestClient(app) as c:
        yield c


def png_bytes(array_uint8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array_uint8).save(buf, format="PNG")
    return buf.getvalue()


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "scanomaly viewer" in r.text
    for attr in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert attr not in r.text


def test_rows_are_sorted_by_score_with_paging_and_filters(client, scored):
    run, _, _ = scored
    sources = client.get("/api/sources").json()
    assert len(sources) == 1 and sources[0]["has_model"] and sources[0]["has_labels"] and sources[0]["n"] == 12
    all_rows = []
    for page in range(3):
        data = client.get("/api/rows", params={"source": 0, "page": page, "per_page": 5}).json()
        assert data["total"] == 12
        all_rows += data["rows"]
    scores = [r["score"] for r in all_rows]
    assert len(all_rows) == 12 and scores == sorted(scores, reverse=True)
    csv_scores = sorted((float(line.split(",")[3]) for line in (run / "scores.csv").read_text().splitlines()[1:]), reverse=True)
    assert scores == pytest.approx(csv_scores)

    abnormal = client.get("/api/rows", params={"label": "abnormal", "per_page": 50}).json()
    assert abnormal["total"] == 3 and {r["label"] for r in abnormal["rows"]} == {"abnormal"}
    unknown = client.get("/api/rows", params={"label": "unknown", "per_page": 50}).json()
    assert unknown["total"] == 6 and all(r["slices"] == 6 for r in unknown["rows"])
    lo, hi = scores[8], scores[4]
    ranged = client.get("/api/rows", params={"min": lo, "max": hi, "per_page": 50}).json()
    assert [r["score"] for r in ranged["rows"]] == scores[4:9]
    assert client.get("/api/rows", params={"per_page": 0}).status_code == 400
    assert client.get("/api/rows", params={"min": "abc"}).status_code == 400
    assert client.get("/api/rows", params={"source": 7}).status_code == 404


def test_roc_matches_sklearn(client):
    from sklearn.metrics import roc_auc_score

    roc = client.get("/api/roc", params={"source": 0}).json()
    assert roc["has_labels"] and len(roc["scores"]) == 6 and sorted(set(roc["labels"])) == [0, 1]
    assert roc["auroc"] == pytest.approx(roc_auc_score(roc["labels"], roc["scores"]))
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1


def test_pictures_of_a_row_and_of_the_slices_of_its_volume(client, scored):
    _, _, detector = scored
    size = detector.preprocessing.image_size
    for kind in ("scan", "healthy", "heatmap"):
        r = client.get(f"/api/image/0/0/{kind}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        im = Image.open(io.BytesIO(r.content))
        assert im.size == (size, size) and im.mode == ("RGBA" if kind == "heatmap" else "L")
    volume_row = client.get("/api/rows", params={"label": "unknown", "per_page": 1}).json()["rows"][0]
    row = volume_row["row"]
    a = client.get(f"/api/image/0/{row}/scan.png", params={"slice": 0}).content
    b = client.get(f"/api/image/0/{row}/scan.png", params={"slice": 5}).content
    assert a != b
    assert client.get(f"/api/image/0/{row}/scan.png", params={"slice": 6}).status_code == 404
    png_row = client.get("/api/rows", params={"label": "abnormal", "per_page": 1}).json()["rows"][0]["row"]
    assert client.get(f"/api/image/0/{png_row}/scan.png", params={"slice": 1}).status_code == 404  # not a volume
    assert client.get("/api/image/0/999/scan.png").status_code == 404
    assert client.get("/api/image/0/0/other.png").status_code == 404


def test_upload_is_scored_with_the_sources_model(client, scored, tmp_path):
    run, tree, detector = scored
    path = sorted((tree / "test" / "abnormal").glob("*.png"))[0]
    before = snapshot(run, tree)
    r = client.post("/api/score", params={"source": 0, "filename": path.name}, content=path.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    import torch

    expected = detector.score(torch.stack([detector.preprocessing.apply(read_image(path)[0])]))[0][0]
    assert body["score"] == pytest.approx(float(expected), rel=1e-5)
    assert body["scan"].startswith("data:image/png;base64,") and body["heatmap"].startswith("data:image/png;base64,")
    assert snapshot(run, tree) == before  # nothing written beside the data or the run
    assert list((tmp_path / "work" / "uploads").iterdir()) == []  # the upload is gone once scored


def test_uploads_too_large_or_not_images_are_refused(client, tmp_path):
    r = client.post("/api/score", params={"source": 0, "filename": "notes.png"}, content=b"this is not an image" * 10)
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (600, 600), dtype=np.uint8))
    assert len(big) > 200_000
    r = client.post("/api/score", params={"source": 0, "filename": "big.png"}, content=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = client.post("/api/score", params={"source": 0, "filename": "x.png"}, content=b"")
    assert r.status_code == 400
    assert list((tmp_path / "work" / "uploads").iterdir()) == []
    # a name that tries to leave the folder names nothing: files get random names inside it
    r = client.post("/api/score", params={"source": 0, "filename": "../../escape.png"},
                    content=png_bytes(np.zeros((40, 40), np.uint8)))
    assert r.status_code == 200 and not (tmp_path / "escape.png").exists()
    assert set(os.listdir(tmp_path)) == {"work"}


def test_folders_are_searched_for_scores_and_their_models(scored, tmp_path):
    run, _, _ = scored
    (tmp_path / "bench" / "padim" / "seed0").mkdir(parents=True)
    (tmp_path / "bench" / "padim" / "seed0" / "test_scores.csv").write_text("path,index,label,score\n/a.png,,1,0.5\n/b.png,,0,0.9\n")
    sources = find_sources(tmp_path / "bench")
    assert [s.name for s in sources] == ["padim/seed0/test_scores.csv"] and sources[0].model_dir is None
    assert [r["score"] for r in sources[0].rows] == [0.9, 0.5]
    assert find_sources(run)[0].model_dir == run / "model"
    assert find_sources(run / "scores.csv", model=run)[0].model_dir == run / "model"


def test_cli_view_refuses_what_it_cannot_show(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.csv")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["view", str(tmp_path / "empty")]) == 2
    assert "no scores CSV" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scored_series(tmp_path_factory):
    """A run whose scores.csv holds a 5-slice DICOM series (files named out of slice order) and one PNG."""
    from test_volumes import write_mr_series

    root = tmp_path_factory.mktemp("viewer_dicom")
    files, _ = write_mr_series(root / "series", n=5)
    png = root / "other" / "plain.png"
    png.parent.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32), dtype=np.uint8)).save(png)
    detector = get_method("ganomaly").from_profile("tiny")
    run = root / "run"
    detector.save(run / "model")
    from scanomaly import discover

    score_stream(detector, discover(root / "series") + discover(png), run / "scores.csv", batch_size=8, workers=0,
                 progress=False)
    return run, files


def test_a_dicom_series_is_scrolled_slice_by_slice_in_anatomical_order(scored_series, tmp_path):
    import pydicom

    run, files = scored_series  # files[k] is the slice at z = 2.5 k mm
    with TestClient(build_app(run, workdir=tmp_path / "work")) as client:
        rows = client.get("/api/rows", params={"per_page": 50}).json()["rows"]
        assert len(rows) == 6
        row_of = {os.path.basename(r["name"]): r for r in rows}
        plain = row_of.pop("plain.png")
        assert plain["slices"] == 0 and plain["slice"] is None
        # every file of the series is a row with the 5-slice scroller, at its place along the slice normal
        for k, path in enumerate(files):
            row = row_of[path.name]
            assert row["slices"] == 5 and row["slice"] == k
            assert float(pydicom.dcmread(path).ImagePositionPatient[2]) == 2.5 * k
        # slice k of any row's series is the k-th file's own picture, its heatmap included
        first = row_of[files[0].name]["row"]
        for k, path in enumerate(files):
            own = row_of[path.name]["row"]
            for kind in ("scan", "heatmap"):
                scrolled = client.get(f"/api/image/0/{first}/{kind}.png", params={"slice": k})
                assert scrolled.status_code == 200
                assert scrolled.content == client.get(f"/api/image/0/{own}/{kind}.png").content
        scans = [client.get(f"/api/image/0/{first}/scan.png", params={"slice": k}).content for k in range(5)]
        assert scans[3] != scans[0]  # the slice with the lesion (the others differ below 8 bits)
        assert client.get(f"/api/image/0/{first}/scan.png", params={"slice": 5}).status_code == 404
        assert client.get(f"/api/image/0/{plain['row']}/scan.png", params={"slice": 0}).status_code == 404
