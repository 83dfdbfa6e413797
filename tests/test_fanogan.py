from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.data import discover, load_images
from scanomaly.methods.fanogan import (
    EncoderTask,
    FAnoGAN,
    WGANGPTask,
    anomaly_map,
    critic_loss,
    generator_loss,
    izif_loss,
)
from scanomaly.nn.wgan_resnet import DownBlock, ResNetCritic, ResNetGenerator, UpBlock, critic_widths, generator_widths
from scanomaly.training.loop import GANTrainer, LoopConfig

from conftest import blobs

REAL_NORMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "train" / "normal"


def tiny(**overrides):
    return FAnoGAN.from_profile("tiny", overrides)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- networks ----------------------------------------------------------------------------------
def test_paper_widths():
    assert generator_widths(64, 64) == [512, 512, 256, 128, 64]
    assert critic_widths(64, 64) == [64, 128, 256, 512, 512]


@pytest.mark.parametrize("size,blocks", [(32, 3), (64, 4), (128, 5)])
def test_block_count_follows_image_size(size, blocks):
    g, d = ResNetGenerator(16, 1, size, 4), ResNetCritic(1, size, 4)
    assert sum(isinstance(m, UpBlock) for m in g.modules()) == blocks
    assert sum(isinstance(m, DownBlock) for m in d.modules()) == blocks
    x = g(torch.randn(2, 16))
    assert x.shape == (2, 1, size, size) and x.abs().max() <= 1
    assert d(x).shape == (2, 1)
    assert d.features(x).shape == (2, 4 * 8 * 4 * 4)  # 8d channels at 4 x 4, flattened


def test_blocks_resample():
    assert UpBlock(8, 4)(torch.randn(2, 8, 4, 4)).shape == (2, 4, 8, 8)
    assert DownBlock(4, 8)(torch.randn(2, 4, 8, 8)).shape == (2, 8, 4, 4)


def test_encoder_is_the_critic_body_with_a_tanh_head():
    e = ResNetCritic(1, 32, 4, out_features=16, tanh=True)
    z = e(blobs(3))
    assert z.shape == (3, 16) and z.abs().max() < 1


def test_critic_treats_samples_independently():
    """LayerNorm, not BatchNorm: a sample's score does not depend on the rest of the batch (the
    gradient penalty is per sample)."""
    d = ResNetCritic(1, 32, 4).train()
    x = blobs(4)
    torch.testing.assert_close(d(x)[:1], d(x[:1]), rtol=1e-5, atol=1e-6)


# -- losses on hand-made tensors -----------------------------------------------------------
def test_izif_loss_values():
    x = torch.zeros(2, 1, 2, 2)
    r = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    fx, fr = torch.zeros(2, 4), torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    # per image: mean squared residual + κ · mean squared feature difference
    torch.testing.assert_close(izif_loss(x, r, fx, fr, kappa=1.0), torch.tensor([1.0, 1.0 + 2.0]))
    torch.testing.assert_close(izif_loss(x, r, fx, fr, kappa=0.5), torch.tensor([1.0, 1.0 + 1.0]))
    assert anomaly_map(x, r)[1].tolist() == [[2.0, 0.0], [0.0, 0.0]]


def test_wgan_losses():
    real, fake = torch.tensor([[2.0], [4.0]]), torch.tensor([[1.0], [-1.0]])
    assert critic_loss(real, fake, torch.tensor(0.5), lambda_gp=10.0).item() == pytest.approx(0.0 - 3.0 + 5.0)
    assert generator_loss(fake).item() == pytest.approx(0.0)


# -- training ----------------------------------------------------------------------------------
def test_stage1_phases_follow_n_critic():
    det = tiny(n_critic=5)
    task = WGANGPTask(det.generator, det.critic, det.config)
    assert [(p.name, p.every) for p in task.phases()] == [("critic", 1), ("generator", 5)]
    for phase in ("critic", "generator"):
        loss, logs = task.loss(phase, {"x": blobs(4)})
        assert torch.isfinite(loss) and logs


def test_encoder_stage_trains_only_the_encoder():
    det = tiny(encoder_lr=1e-3)
    x = blobs(16, seed=1)
    g0, d0, e0 = state(det.generator), state(det.critic), state(det.encoder)
    task = EncoderTask(det.encoder, det.generator, det.critic, det.config)
    assert set(task.modules()) == {"encoder"}
    batch = {"x": x[:8]}
    with torch.no_grad():
        before, _ = task.loss("encoder", batch)
    GANTrainer(task, {"x": x}, LoopConfig(iterations=25, batch_size=8), progress=False).fit()
    assert_same_state(g0, state(det.generator))  # weights and BatchNorm statistics
    assert_same_state(d0, state(det.critic))
    assert any(not torch.equal(e0[k], v) for k, v in state(det.encoder).items())
    with torch.no_grad():
        after, _ = task.loss("encoder", batch)
    assert after < before


def test_fit_writes_both_stages_and_reloads_them(tmp_path):
    x = blobs(16, seed=1)
    det = tiny().fit(x, work_dir=tmp_path, progress=False)
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "checkpoint.pt").is_file()
        assert (tmp_path / stage / "losses.csv").read_text().startswith("step,")
    assert det.train_result.steps == 20 and det.encoder_result.steps == 10
    assert {"stage1", "stage2"} <= set(det.extra_state())
    # a finished run in the same folder is reloaded, not retrained
    again = tiny().fit(x, work_dir=tmp_path, progress=False)
    for a, b in zip(again.scoring.values(), det.scoring.values()):
        assert_same_state(state(a), state(b))


def test_killed_encoder_stage_resumes_to_the_same_model(tmp_path, monkeypatch):
    x = blobs(16, seed=1)
    settings = {"encoder_iterations": 20, "checkpoint_every": 10}
    full = tiny(**settings).fit(x, work_dir=tmp_path / "full", progress=False)

    calls = {"n": 0}
    original = EncoderTask.loss

    def dying_loss(self, phase, batch):  # killed in encoder iteration 15, after the checkpoint at 10
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original(self, phase, batch)

    monkeypatch.setattr(EncoderTask, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        tiny(**settings).fit(x, work_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(EncoderTask, "loss", original)
    assert torch.load(tmp_path / "killed" / "stage2" / "checkpoint.pt", weights_only=True)["step"] == 10

    resumed = tiny(**settings).fit(x, work_dir=tmp_path / "killed", progress=False)
    for a, b in zip(full.scoring.values(), resumed.scoring.values()):
        assert_same_state(state(a), state(b))

    # both stages' time before the kill is credited: all of stage 1, stage 2 up to its checkpoint
    credited = [torch.load(tmp_path / "killed" / stage / "checkpoint.pt", weights_only=True)["seconds"]
                for stage in ("stage1", "stage2")]
    assert resumed.train_result.seconds == pytest.approx(credited[0], abs=0.05)  # stage 1 was finished: not run again
    assert resumed.training_seconds_before_resume() >= credited[0] > 0


@pytest.fixture(scope="module")
def fitted():
    return tiny().fit(blobs(16, seed=1), progress=False)


def test_score_is_izif_per_image_in_one_pass(fitted):
    det = fitted
    x = blobs(5, seed=9)
    scores, maps = det.score(x, batch_size=2)
    assert scores.shape == (5,) and maps.shape == (5, 32, 32) and maps.dtype == np.float32
    with torch.no_grad():
        r = det.generator(det.encoder(x))
        expected = izif_loss(x, r, det.critic.features(x), det.critic.features(r), kappa=1.0)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps, anomaly_map(x, r).numpy(), rtol=1e-5, atol=1e-6)
    # an image scores the same alone as in a batch (eval mode: no batch statistics)
    np.testing.assert_allclose(det.score(x[:1])[0], scores[:1], rtol=1e-5, atol=1e-6)
    assert det.reconstruct(x[:2]).shape == (2, 1, 32, 32)


def test_tiny_end_to_end_on_real_images(tmp_path):
    if not REAL_NORMALS.is_dir():
        pytest.skip(f"real chest X-rays not found at {REAL_NORMALS} (../shared/data beside the repository)")
    det = tiny()
    images = load_images(discover(REAL_NORMALS)[:24], det.preprocessing, progress=False)
    det.fit(images.subset(range(16)), work_dir=tmp_path, progress=False)
    scores, maps = det.score(images.subset(range(16, 24)))
    assert scores.shape == (8,) and np.isfinite(scores).all() and np.isfinite(maps).all()
