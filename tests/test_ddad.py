import copy
import csv
import math

import numpy as np
import pytest
import torch

from scanomaly.cli import main
from scanomaly.detector import Detector, available_methods, get_method
from scanomaly.errors import ScanomalyError
from scanomaly.methods.ddad import (
    DDAD,
    Autoencoder,
    DiscrepancyScorer,
    EnsembleTask,
    Refiner,
    RefinementTask,
    focal_loss,
    paste_foreign_patches,
    reconstruction_loss,
)

from conftest import blobs


def tiny(**overrides) -> DDAD:
    return DDAD.from_profile("tiny", overrides)


def members(k: int, uncertainty: bool = False, size: int = 32) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(Autoencoder(1, size, 8, 4, 32, uncertainty) for _ in range(k)).eval()


# -- networks and maps -------------------------------------------------------------------------
@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 64)])
def test_autoencoder_shapes(uncertainty, channels, size):
    ae = Autoencoder(channels, size, latent_size=16, width=4, hidden=32, uncertainty=uncertainty).eval()
    rec, log_var = ae(torch.rand(3, channels, size, size) * 2 - 1)
    assert rec.shape == (3, channels, size, size)
    assert (log_var is None) != uncertainty
    if uncertainty:
        assert log_var.shape == rec.shape


@pytest.mark.parametrize("score", ["intra", "inter", "refined"])
def test_ensemble_scorer_shapes_and_networks(score):
    k = 3
    ndm, udm = members(k), members(k)
    scorer = DiscrepancyScorer(ndm, udm, Refiner(8).eval(), score).eval()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        rec, scores, heatmap = scorer(x)
    assert rec.shape == (5, 1, 32, 32) and scores.shape == (5,) and heatmap.shape == (5, 32, 32)
    torch.testing.assert_close(scores, heatmap.flatten(1).mean(1))
    autoencoders = [m for m in scorer.modules() if isinstance(m, Autoencoder)]
    assert len(autoencoders) == (k if score == "intra" else 2 * k)  # only the networks the score needs
    assert any(isinstance(m, Refiner) for m in scorer.modules()) == (score == "refined")


def test_intra_map_is_zero_for_identical_members_and_not_otherwise():
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    one = members(1)[0]
    same = torch.nn.ModuleList(copy.deepcopy(one) for _ in range(3)).eval()
    with torch.no_grad():
        _, intra, _ = DiscrepancyScorer(same, None, None, "intra").discrepancies(x)
        _, intra_diverse, _ = DiscrepancyScorer(members(3), None, None, "intra").discrepancies(x)
    assert intra.shape == (4, 32, 32)
    assert intra.abs().max() < 1e-6
    assert intra_diverse.min() >= 0 and intra_diverse.mean() > 1e-3


def test_inter_map_is_zero_when_udm_equals_ndm():
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    ndm = members(3)
    with torch.no_grad():
        _, _, inter = DiscrepancyScorer(ndm, ndm, None, "inter").discrepancies(x)
        _, _, inter_other = DiscrepancyScorer(ndm, members(3), None, "inter").discrepancies(x)
    assert torch.equal(inter, torch.zeros_like(inter))
    assert inter_other.mean() > 1e-3


def test_aeu_maps_are_divided_by_the_predicted_sigma():
    torch.manual_seed(0)
    ndm, udm = members(3, uncertainty=True), members(3, uncertainty=True)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        _, intra, inter = DiscrepancyScorer(ndm, udm, None, "inter").discrepancies(x)
        outs = [m(x) for m in ndm]
        recs = torch.stack([r for r, _ in outs])
        var = torch.stack([torch.exp(v) for _, v in outs]).mean(0)[:, 0]
        expected_intra = recs.std(0)[:, 0] / var.sqrt()  # torch.std: unbiased, as the original
        expected_inter = (torch.stack([m(x)[0] for m in udm]).mean(0) - recs.mean(0))[:, 0].abs() / var.sqrt()
    torch.testing.assert_close(intra, expected_intra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inter, expected_inter, rtol=1e-5, atol=1e-6)


# -- losses and synthetic anomalies -------------------------------------------------------------
def test_reconstruction_losses_against_hand_computed_values():
    x = torch.tensor([[[[0.5, -0.5]]]])
    rec = torch.zeros_like(x)
    assert reconstruction_loss(x, rec, None).item() == pytest.approx(0.25)
    log_var = torch.tensor([[[[0.0, math.log(2.0)]]]])
    # mean(exp(−logσ²)·err) = mean(1·0.25, 0.5·0.25) = 0.1875; mean(logσ²) = ln 2 / 2
    assert reconstruction_loss(x, rec, log_var).item() == pytest.approx(0.1875 + math.log(2.0) / 2)


def test_focal_loss_against_hand_computed_value():
    logits, target = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    p = 1 / (1 + math.exp(-2.0))
    expected = (0.5**2 * math.log(2.0) + p**2 * -math.log(1 - p)) / 2
    assert focal_loss(logits, target, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_synthetic_anomalies_paste_inside_the_image_with_the_right_mask():
    n, size = 6, 40
    levels = torch.linspace(-0.9, 0.9, n)
    x = levels[:, None, None, None].expand(n, 1, size, size).clone()  # image i is the constant levels[i]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        out, mask = paste_foreign_patches(x, probability=1.0, size_range=(0.05, 0.2), generator=g)
        assert out.shape == x.shape and mask.shape == (n, 1, size, size)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        for i in range(n):
            m = mask[i, 0].bool()
            rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
            h, w = len(rows), len(cols)
            assert int(m.sum()) == h * w  # one rectangle, inside the image by construction of the check
            assert round(0.05 * size) <= h <= round(0.2 * size) and round(0.05 * size) <= w <= round(0.2 * size)
            assert torch.equal(out[i, 0][~m], x[i, 0][~m])  # nothing changes outside the mask
            inside = out[i, 0][m]
            assert torch.allclose(inside, inside[0].expand_as(inside))  # one blend of two constants
            # the blend (1 − α)·own + α·other with α in [0.5, 1] and `other` another image's level
            alphas = [(float(inside[0]) - levels[i]) / (levels[j] - levels[i]) for j in range(n) if j != i]
            assert any(0.5 - 1e-5 <= float(a) <= 1 + 1e-5 for a in alphas)
    out, mask = paste_foreign_patches(x, probability=0.0, generator=g)
    assert torch.equal(out, x) and not mask.any()


def test_about_half_the_images_get_an_anomaly():
    out, mask = paste_foreign_patches(blobs(400, seed=1), probability=0.5, generator=torch.Generator().manual_seed(0))
    hit = mask.flatten(1).any(1).float().mean().item()
    assert 0.4 < hit < 0.6


# -- training ----------------------------------------------------------------------------------
def test_training_lowers_the_reconstruction_and_focal_losses():
    xb, xa = blobs(24, seed=1), blobs(24, seed=2)
    fresh = tiny(iterations=60, refine_iterations=40, selection="last")
    for network in (fresh.ndm, fresh.udm, fresh.refiner):
        network.eval()
    before = copy.deepcopy(fresh)
    fitted = fresh.fit(xb, xa, progress=False)
    with torch.no_grad():
        for module in ("ndm", "udm"):
            x = xb if module == "ndm" else torch.cat([xb, xa])
            loss = [float(np.mean([reconstruction_loss(x, *m(x)).item() for m in getattr(d, module)])) for d in (before, fitted)]
            assert loss[1] < 0.8 * loss[0], (module, loss)
        torch.manual_seed(0)
        x, target = paste_foreign_patches(xb, 0.5)
        _, intra, inter = DiscrepancyScorer(fitted.ndm, fitted.udm, None, "inter").discrepancies(x)
        maps = torch.stack([inter, intra], 1)
        focal = [focal_loss(d.refiner(maps), target).item() for d in (before, fitted)]
    assert focal[1] < focal[0], focal


def test_fit_needs_unlabeled_and_options_are_checked():
    with pytest.raises(ScanomalyError, match="unlabeled"):
        tiny().fit(blobs(8), None, progress=False)
    with pytest.raises(ScanomalyError, match="refine='dual'"):
        tiny(refine="none", score="refined")
    with pytest.raises(ScanomalyError, match="backbone"):
        tiny(backbone="vae")
    with pytest.raises(ScanomalyError, match="ensemble"):
        tiny(ensemble=1)


@pytest.mark.parametrize("overrides", [{"score": "refined"}, {"score": "inter", "backbone": "aeu"},
                                       {"score": "intra", "refine": "none"}])
def test_save_load_gives_identical_scores_and_maps(tmp_path, overrides):
    xb, xa = blobs(16, seed=1), blobs(16, seed=2)
    det = tiny(**overrides).fit(xb, xa, work_dir=tmp_path / "run", progress=False)
    det.save(tmp_path / "model")
    loaded = Detector.load(tmp_path / "model")
    x = torch.cat([blobs(4, seed=3), blobs(4, seed=4, lesion=True)])
    s1, m1 = det.score(x)
    s2, m2 = loaded.score(x)
    assert s1.shape == (8,) and m1.shape == (8, 32, 32) and np.ptp(s1) > 0
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)


def test_heatmap_is_the_discrepancy_map_not_the_residual():
    xb, xa = blobs(16, seed=1), blobs(16, seed=2)
    det = tiny(score="inter").fit(xb, xa, progress=False)
    x = blobs(4, seed=5, lesion=True)
    scores, maps, reconstruction = det.score_and_reconstruct(x)
    with torch.no_grad():
        _, _, inter = det.scoring_network().eval().discrepancies(x)
    np.testing.assert_allclose(maps, inter.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(scores, inter.flatten(1).mean(1).numpy(), rtol=1e-6)
    assert reconstruction.shape == (4, 1, 32, 32)
    assert not np.allclose(maps, np.abs(x.numpy() - reconstruction).mean(1))


def test_one_model_scores_all_three_ways(tmp_path):
    xb, xa = blobs(16, seed=1), blobs(16, seed=2)
    tiny().fit(xb, xa, work_dir=tmp_path, progress=False).save(tmp_path / "model")
    x = blobs(6, seed=5, lesion=True)
    scores = {}
    for score in ("intra", "inter", "refined"):
        det = Detector.load(tmp_path / "model")
        det.config.score = score
        scores[score] = det.score(x)[0]
    assert not np.allclose(scores["intra"], scores["inter"]) and not np.allclose(scores["inter"], scores["refined"])
    assert (scores["refined"] > 0).all() and (scores["refined"] < 1).all()  # a mean of sigmoid probabilities


def _weights(det: DDAD) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in det.state_tensors().items()}


@pytest.mark.parametrize("stage", ["ensembles", "refinement"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, stage):
    xb, xa = blobs(20, seed=1), blobs(20, seed=2)
    options = {"iterations": 12, "refine_iterations": 8, "checkpoint_every": 4}  # AUCp picks the refiner
    full = tiny(**options).fit(xb, xa, work_dir=tmp_path / "full", progress=False)

    # a run "killed" in iteration 7 of one stage, after its checkpoint at 4
    task = EnsembleTask if stage == "ensembles" else RefinementTask
    calls_per_iteration = 4 if stage == "ensembles" else 1  # tiny: 2 members per module
    calls = {"n": 0}
    original = task.loss

    def dying_loss(self, phase, batch):
        calls["n"] += 1
        if calls["n"] > 6 * calls_per_iteration + 1:
            raise KeyboardInterrupt
        return original(self, phase, batch)

    monkeypatch.setattr(task, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        tiny(**options).fit(xb, xa, work_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(task, "loss", original)
    state = torch.load(tmp_path / "killed" / stage / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4

    resumed = tiny(**options).fit(xb, xa, work_dir=tmp_path / "killed", progress=False)
    assert resumed.train_result.steps == 12 and resumed.refine_result.steps == 8
    assert resumed.extra_state()["selected_refine_step"] == full.extra_state()["selected_refine_step"]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.training_seconds_before_resume() > 0


def test_aucp_keeps_the_best_refiner_checkpoint(tmp_path):
    xb, xa = blobs(30, seed=1), torch.cat([blobs(15, seed=2), blobs(15, seed=3, lesion=True)])
    det = tiny(iterations=12, refine_iterations=12, checkpoint_every=3).fit(xb, xa, work_dir=tmp_path, progress=False)
    extra = det.extra_state()
    history = extra["aucp_history"]
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    best = max(history, key=lambda h: h["metric"])
    assert extra["selected_refine_step"] == best["step"] and extra["aucp"] == best["metric"]


# -- export and the CLI -------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["intra", "inter", "refined"])
def test_onnx_export_equals_pytorch(tmp_path, score):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from scanomaly.export import OnnxScorer, export_onnx

    det = tiny(score=score, backbone="aeu" if score == "inter" else "ae").fit(
        blobs(16, seed=1), blobs(16, seed=2), progress=False)
    result = export_onnx(det, tmp_path / "model.onnx")
    assert result.max_score_difference < 1e-4
    x = torch.cat([blobs(3, seed=3), blobs(4, seed=4, lesion=True)])
    scores, maps, reconstructions = det.score_and_reconstruct(x)
    o_scores, o_maps, o_rec = OnnxScorer(result.path).score_and_reconstruct(x, batch_size=5)
    assert np.ptp(scores) > 0
    np.testing.assert_allclose(o_scores, scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(o_maps, maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(o_rec, reconstructions, rtol=0, atol=1e-4)


def test_cli_train_and_score_tiny_profile(tiny_tree, tmp_path, capsys):
    assert "ddad" in available_methods()
    run_dir = tmp_path / "run"
    code = main(["train", "ddad", "--from-labeled", str(tiny_tree), "--out", str(run_dir), "--profile", "tiny",
                 "--no-progress", "--device", "cpu", "--set", "selection=last"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    assert (run_dir / "ensembles" / "checkpoint.pt").is_file() and (run_dir / "refinement" / "checkpoint.pt").is_file()
    code = main(["score", str(run_dir), str(tiny_tree / "test"), "--out", str(tmp_path / "s.csv"),
                 "--heatmaps", str(tmp_path / "maps"), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and all(0 < float(r["score"]) < 1 for r in rows)  # refined: mean probabilities
    assert len(list((tmp_path / "maps").glob("*.png"))) == 12
    assert get_method("ddad") is DDAD
