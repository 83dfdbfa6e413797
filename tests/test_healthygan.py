import csv
import functools
import os
import warnings

import numpy as np
import pytest
import torch

from scanomaly.errors import ScanomalyError, TrainingDiverged
from scanomaly.methods.healthygan import (
    HealthyGAN,
    HealthyGANTask,
    MaskedTranslator,
    PatchCritic,
    anomaly_map,
    identity_loss,
    mask_loss,
    reconstruction_loss,
)
from scanomaly.nn.blocks import gradient_penalty

from conftest import blobs


# -- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 64)])
def test_generator_shapes_and_ranges(channels, size):
    g = MaskedTranslator(channels, width=8, residual_blocks=2)
    x = torch.rand(3, channels, size, size) * 2 - 1
    healthy, t, m = g(x)
    assert healthy.shape == x.shape and t.shape == x.shape and m.shape == (3, 1, size, size)
    assert m.min() >= 0 and m.max() <= 1
    assert t.min() >= -1 and t.max() <= 1
    # the blend: healthy = M·T + (1−M)·x
    torch.testing.assert_close(healthy, m * t + (1 - m) * x)


def test_generator_has_no_biases():
    g = MaskedTranslator(1, 8, 1)
    convs = [m for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(c.bias is None for c in convs)


@pytest.mark.parametrize("size,expected_layers", [(256, 6), (64, 4), (32, 3)])
def test_critic_depth_follows_image_size(size, expected_layers):
    d = PatchCritic(1, size, width=8, max_width=64)
    strided = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == expected_layers
    assert d(torch.zeros(2, 1, size, size)).shape == (2, 1, 4, 4)


def test_paper_critic_widths():
    d = PatchCritic(3, 256, width=64, max_width=2048)
    widths = [m.out_channels for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [64, 128, 256, 512, 1024, 2048, 1]


# -- losses on hand-made tensors -----------------------------------------------------------
def test_mask_loss_values():
    zeros = torch.zeros(1, 1, 2, 2)
    ones = torch.ones(1, 1, 2, 2)
    half = torch.full((1, 1, 2, 2), 0.5)
    assert mask_loss(zeros).item() == pytest.approx(0.0, abs=1e-6)  # small and binary: no penalty
    assert mask_loss(ones).item() == pytest.approx(1.0, abs=1e-6)  # binary but large: (mean M)² = 1
    assert mask_loss(half).item() == pytest.approx(0.25 + 100 - 1 / 0.51, rel=1e-6)


def test_identity_loss_uses_raw_translation():
    x = torch.tensor([[[[0.5, -0.5]]]])
    t = torch.tensor([[[[0.0, 0.0]]]])
    assert identity_loss(x, t).item() == pytest.approx(0.5)


def test_reconstruction_loss_ignores_masked_region():
    x = torch.tensor([[[[1.0, 1.0]]]])
    t = torch.tensor([[[[-1.0, 1.0]]]])
    mask_on_diff = torch.tensor([[[[1.0, 0.0]]]])  # where T differs, the mask is on: no penalty
    mask_off_diff = torch.tensor([[[[0.0, 1.0]]]])  # where T differs, the mask is off: |1 − (−1)| = 2 on one of two pixels
    assert reconstruction_loss(x, t, mask_on_diff).item() == pytest.approx(0.0)
    assert reconstruction_loss(x, t, mask_off_diff).item() == pytest.approx(1.0)


def test_anomaly_map_and_score():
    x = torch.ones(1, 1, 2, 2)
    healthy = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]])
    amap = anomaly_map(x, healthy)
    assert amap.tolist() == [[[0.0, 2.0], [0.0, 0.0]]]


def test_gradient_penalty_matches_direct_autograd():
    torch.manual_seed(0)
    critic = PatchCritic(1, 32, width=4, max_width=8)
    real, fake = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    torch.manual_seed(123)
    gp = gradient_penalty(critic, real, fake)
    # same α draw, by hand
    torch.manual_seed(123)
    alpha = torch.rand(3, 1, 1, 1)
    expected = []
    for i in range(3):
        xi = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(xi).sum(), xi)
        expected.append((g.norm() - 1) ** 2)
    torch.testing.assert_close(gp, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    # and it is differentiable w.r.t. the critic (create_graph)
    gp.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


# -- training ----------------------------------------------------------------------------------
def tiny(**overrides):
    cfg = {"iterations": 30, "checkpoint_every": 15, "sample_every": 1000, **overrides}
    return HealthyGAN.from_profile("tiny", cfg)


def test_training_lowers_identity_and_reconstruction_losses():
    torch.manual_seed(0)
    det = tiny(iterations=60, selection="last", lr=1e-3)
    xb, xa = blobs(24, seed=1), torch.cat([blobs(16, seed=2), blobs(8, seed=3, lesion=True)])
    task = HealthyGANTask(det.generator, det.critic, det.config)
    batch = {"a": xa[:8], "b": xb[:8]}
    with torch.no_grad():
        _, before = task.loss("generator", batch)
    det.fit(xb, xa, progress=False)
    with torch.no_grad():
        _, after = task.loss("generator", batch)
    assert after["G/id"] < before["G/id"]
    assert after["G/rec"] < before["G/rec"]


def test_fit_requires_unlabeled_set():
    with pytest.raises(ScanomalyError, match="unlabeled"):
        tiny().fit(blobs(4))


def test_aucp_selection_keeps_best_checkpoint(tmp_path):
    det = tiny(iterations=30, checkpoint_every=10).fit(blobs(20, seed=1), blobs(20, seed=2), work_dir=tmp_path, progress=False)
    history = det.train_result.history
    assert [h["step"] for h in history] == [10, 20, 30]
    best = max(history, key=lambda h: h["metric"])
    assert det.train_result.best_step == best["step"]
    assert (tmp_path / "best.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best.safetensors", "checkpoint.pt"):  # readable like any other file the run writes, not 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "losses.csv").read_text().startswith("step,")
    assert list((tmp_path / "samples").glob("*.png"))


def test_selection_last_keeps_the_final_weights(tmp_path):
    xb, xa, hold = blobs(20, seed=1), blobs(20, seed=2), blobs(8, seed=3)
    last = tiny(iterations=30, checkpoint_every=10, selection="last").fit(xb, xa, holdout=hold, work_dir=tmp_path / "last", progress=False)
    extra = last.extra_state()
    assert extra["selected_step"] == 30 and extra["aucp_history"] == [] and extra["aucp"] is None
    picked = tiny(iterations=30, checkpoint_every=10).fit(xb, xa, holdout=hold, work_dir=tmp_path / "aucp", progress=False)
    assert picked.extra_state()["selected_step"] < 30  # this seed's AUCp peaks early: the two rules keep different weights
    assert not np.allclose(last.score(xa)[0], picked.score(xa)[0])


def test_fit_with_and_without_a_work_dir_selects_the_same_model(tmp_path):
    # AUCp's choice travels back from the trainer in memory: without a work folder the detector must score with the
    # selected checkpoint too, not with the last EMA weights
    xb, xa, hold = blobs(20, seed=1), blobs(20, seed=2), blobs(8, seed=3)
    on_disk = tiny(iterations=30, checkpoint_every=10).fit(xb, xa, holdout=hold, work_dir=tmp_path / "run", progress=False)
    in_memory = tiny(iterations=30, checkpoint_every=10).fit(xb, xa, holdout=hold, progress=False)
    last = tiny(iterations=30, checkpoint_every=10, selection="last").fit(xb, xa, holdout=hold, progress=False)
    assert in_memory.extra_state()["selected_step"] == on_disk.extra_state()["selected_step"] < 30
    np.testing.assert_array_equal(in_memory.score(xa)[0], on_disk.score(xa)[0])
    assert not np.allclose(in_memory.score(xa)[0], last.score(xa)[0])  # the last weights are another model


def test_small_aucp_pool_warns_and_large_one_does_not(tmp_path):
    # 10 healthy -> 1 held out; 10 unlabeled -> 1 held out: AUCp would rank two images
    with pytest.warns(UserWarning, match=r"only 1 held-out healthy and 1 held-out unlabeled"):
        tiny(iterations=10).fit(blobs(10, seed=1), blobs(10, seed=2), work_dir=tmp_path / "small", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny(iterations=10, holdout_fraction=0.5, aucp_pool=64).fit(blobs(40, seed=1), blobs(40, seed=2), work_dir=tmp_path / "big", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # selection=last computes no AUCp, so nothing to warn about
        tiny(iterations=10, selection="last").fit(blobs(10, seed=1), blobs(10, seed=2), work_dir=tmp_path / "last", progress=False)


def test_sample_grid_shows_the_scoring_ema_generator(tmp_path, monkeypatch):
    # the grids must show what the detector will score with (the EMA copy), not the live generator
    recorded = []
    original = HealthyGANTask.sample_rows

    def recording(self, batch, nets):
        rows = original(self, batch, nets)
        recorded.append((batch["a"].clone(), dict(rows)["healthy"].clone(), self.generator))
        return rows

    monkeypatch.setattr(HealthyGANTask, "sample_rows", recording)
    det = tiny(iterations=20, sample_every=20, selection="last").fit(
        blobs(12, seed=1), blobs(12, seed=2), work_dir=tmp_path, progress=False
    )
    x, healthy_in_grid, live = recorded[-1]
    with torch.no_grad():
        scored = det.scoring_generator.eval()(x)[0]
        live_out = live.eval()(x)[0]
    torch.testing.assert_close(healthy_in_grid, scored)
    assert not torch.allclose(healthy_in_grid, live_out, atol=1e-4)  # EMA 0.9 lags the live weights


def _weights(det):
    return {k: v.clone() for k, v in det.generator.state_dict().items()} | {
        f"critic.{k}": v.clone() for k, v in det.critic.state_dict().items()
    }


@pytest.mark.parametrize("options", [
    {},
    {"critic": "lite0", "critic_weights": "random"},  # a frozen trunk in the critic: saved, restored, never trained
    # the mask's target is rebuilt on resume from B's bank and the held-out scans: it must be the same target
    {"critic": "lite0", "critic_weights": "random", "score": "critic", "heatmap": "nearest", "mask_target": 10.0},
], ids=["paper", "lite0-critic", "mask-target"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, options):
    xb, xa = blobs(20, seed=1), blobs(20, seed=2)
    run = functools.partial(tiny, **options)
    full = run(selection="last").fit(xb, xa, work_dir=tmp_path / "full", progress=False)

    # a run "killed" by an exception in the middle of iteration 21, after the checkpoint at 15
    calls = {"n": 0}
    original = HealthyGANTask.loss

    def dying_loss(self, phase, batch):
        calls["n"] += 1
        if calls["n"] > 31:  # 20 iterations × 1.5 phase calls, plus one
            raise KeyboardInterrupt
        return original(self, phase, batch)

    monkeypatch.setattr(HealthyGANTask, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run(selection="last").fit(xb, xa, work_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(HealthyGANTask, "loss", original)

    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 15
    resumed = run(selection="last").fit(xb, xa, work_dir=tmp_path / "killed", progress=False)
    assert resumed.train_result.steps == 30
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # the training time of the first attempt (up to its checkpoint) is carried over, not restarted
    assert full.training_seconds_before_resume() == 0.0
    assert state["seconds"] > 0
    assert resumed.training_seconds_before_resume() == pytest.approx(state["seconds"])
    assert resumed.train_result.seconds > state["seconds"]
    with open(tmp_path / "killed" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    steps, seconds = [int(r["step"]) for r in rows], [float(r["seconds"]) for r in rows]
    assert steps == [25, 30]  # logged every 25 iterations and at the end, both after the resume
    assert seconds[0] >= round(state["seconds"], 1) and seconds == sorted(seconds)


def test_resume_with_other_iteration_count_is_refused(tmp_path):
    xb, xa = blobs(8, seed=1), blobs(8, seed=2)
    tiny(selection="last", iterations=10, checkpoint_every=5).fit(xb, xa, work_dir=tmp_path, progress=False)
    with pytest.raises(ScanomalyError, match="iterations"):
        tiny(selection="last", iterations=20, checkpoint_every=5).fit(xb, xa, work_dir=tmp_path, progress=False)


def test_nan_guard_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = HealthyGANTask.loss

    def nan_loss(self, phase, batch):
        calls["n"] += 1
        loss, logs = original(self, phase, batch)
        return (loss * float("nan"), logs) if calls["n"] > 20 else (loss, logs)

    monkeypatch.setattr(HealthyGANTask, "loss", nan_loss)
    with pytest.raises(TrainingDiverged, match="NaN/inf.*last good checkpoint"):
        tiny(selection="last", checkpoint_every=5).fit(blobs(8, seed=1), blobs(8, seed=2), work_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["modules"]["generator"].values() if v.is_floating_point())


@pytest.mark.parametrize("n, fraction, n_held", [(1, 0.1, 0), (2, 0.1, 1), (10, 0.1, 1), (31, 0.1, 3), (5, 0.9, 4)])
def test_the_hold_out_takes_at_least_one_never_all_and_names_the_same_scans_every_time(n, fraction, n_held):
    """Benchmarks rebuild which scans fit held out (AUCp's pool) from `split_off_indices`: it must be `_split_off`'s."""
    from scanomaly.methods.healthygan import _split_off, split_off_indices

    kept, held = split_off_indices(n, fraction, seed=3)
    assert len(held) == n_held and sorted(torch.cat([kept, held]).tolist()) == list(range(n))
    x = torch.arange(n)
    x_kept, x_held = _split_off(x, fraction, seed=3)
    assert x_held.tolist() == held.tolist() and x_kept.tolist() == kept.tolist()
    assert split_off_indices(n, fraction, seed=3)[1].tolist() == held.tolist()
