import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.data import ImageRecord, load_images
from scanomaly.errors import ScanomalyError
from scanomaly.methods.alad import (
    ALAD,
    ALADTask,
    Encoder,
    Generator,
    ImageCycleDiscriminator,
    JointDiscriminator,
    LatentCycleDiscriminator,
    anomaly_map,
    feature_matching_score,
    real_fake_loss,
    spectral_normalised,
)
from scanomaly.nn.blocks import EMA

from conftest import blobs

REAL_NORMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "train" / "normal"


def tiny(**overrides):
    return ALAD.from_profile("tiny", overrides)


# -- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size,dxx_layers", [(1, 32, 2), (3, 64, 3)])
def test_network_shapes(channels, size, dxx_layers):
    x, z = torch.rand(3, channels, size, size) * 2 - 1, torch.randn(3, 10)
    e, g = Encoder(channels, size, 10, 8, 32), Generator(channels, size, 10, 8, 32)
    assert e(x).shape == (3, 10) and g(z).shape == x.shape
    logits, feats = JointDiscriminator(channels, size, 10, 8, 32, joint_width=16)(x, z)
    assert logits.shape == (3,) and feats.shape == (3, 16)
    d_xx = ImageCycleDiscriminator(channels, size, width=8)
    logits, feats = d_xx(x, x)
    # D_xx keeps going down to an 8x8 map: two layers at 32 px (as in the code), three at 64
    assert sum(isinstance(m, torch.nn.Conv2d) for m in d_xx.features) == dxx_layers
    assert logits.shape == (3,) and feats.shape == (3, 8 * 2 ** (dxx_layers - 1) * 64)
    logits, feats = LatentCycleDiscriminator(10, width=8)(z, z)
    assert logits.shape == (3,) and feats.shape == (3, 4)


def test_paper_networks_match_the_official_cifar10_code():
    e = Encoder(3, 32)
    assert [m.out_channels for m in e.modules() if isinstance(m, torch.nn.Conv2d)] == [128, 256, 512, 100]
    g = Generator(3, 32)
    assert [m.out_channels for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 3]
    d_xx = ImageCycleDiscriminator(3, 32)
    assert [(m.out_channels, m.kernel_size) for m in d_xx.features if isinstance(m, torch.nn.Conv2d)] == [(64, (5, 5)), (128, (5, 5))]
    d_xz = JointDiscriminator(3, 32)
    assert d_xz.joint[0].in_features == 512 * 4 * 4 + 512 and d_xz.joint[0].out_features == 1024


def test_spectral_norm_in_every_discriminator_layer_but_the_logit():
    torch.manual_seed(0)  # the power iteration's convergence in 30 steps depends on its random start
    d_xz, d_xx, d_zz = JointDiscriminator(1, 32, 10, 8, 32, 16), ImageCycleDiscriminator(1, 32, 8), LatentCycleDiscriminator(10, 8)
    for d in (d_xz, d_xx, d_zz):
        layers = [n for n, m in d.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert sorted(spectral_normalised(d)) == sorted(n for n in layers if n != "head")
    # the encoder too (as in the code), except its last, latent conv; the generator has none
    e = Encoder(1, 32, 10, 8, 32)
    assert len(spectral_normalised(e)) == 3 and "net.6" not in spectral_normalised(e)
    assert spectral_normalised(Generator(1, 32, 10, 8, 32)) == []
    # it does normalise: after some training-mode power iterations, the largest singular value is 1
    layer = d_zz.features[0]
    for _ in range(30):
        d_zz(torch.randn(4, 10), torch.randn(4, 10))
    assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-3)


def test_spectral_norm_state_dict_round_trips():
    torch.manual_seed(0)
    d = ImageCycleDiscriminator(1, 32, 8)
    x = torch.rand(2, 1, 32, 32)
    for _ in range(3):  # training forwards move the power-iteration vectors
        d(x, x)
    state = d.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    assert any(k.endswith("parametrizations.weight.0._u") for k in state)
    torch.manual_seed(1)
    fresh = ImageCycleDiscriminator(1, 32, 8)
    fresh.load_state_dict(state)
    d.eval()
    fresh.eval()
    torch.testing.assert_close(d(x, x)[1], fresh(x, x)[1], rtol=0, atol=0)
    # and the loop's EMA copies (deepcopy) of a parametrized network work
    ema = EMA(d, 0.5)
    ema.update(d)
    torch.testing.assert_close(ema.module(x, x)[1], d(x, x)[1])


# -- losses on hand-made tensors -----------------------------------------------------------
def test_real_fake_loss():
    assert real_fake_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    assert real_fake_loss(torch.full((3,), 30.0), torch.full((3,), -30.0)).item() < 1e-10
    # swapping the arguments gives the encoder/generator side: it wants the opposite labels
    assert real_fake_loss(torch.full((3,), -30.0), torch.full((3,), 30.0)).item() == pytest.approx(60.0, rel=1e-4)  # 30 + 30


def test_feature_matching_score_is_l1_norm():
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.5], [0.0, 1.0, -1.0]])
    assert feature_matching_score(a, b).tolist() == [3.0, 2.0]
    assert anomaly_map(torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, -1.0]]]])).tolist() == [[[0.0, 2.0]]]


def test_summed_generator_loss_gives_each_network_the_codes_gradient():
    """The code minimises L_G = gen_xz + cycle for G and L_E = enc_xz + cycle for E; one optimizer on
    gen_xz + enc_xz + cycle gives every weight the same gradient, because gen_xz does not depend on
    E and enc_xz not on G."""
    det = tiny()
    task = ALADTask(det.encoder, det.generator, det.d_xz, det.d_xx, det.d_zz, det.config)
    for m in task.modules().values():
        m.eval()  # no dropout, no batch statistics: the same forward each time
    x = blobs(4)

    def grads(which):
        torch.manual_seed(0)
        lg = task._logits(x, with_grad=True)
        xz_gen = torch.nn.functional.binary_cross_entropy_with_logits(lg["xz_gen"], torch.ones(4))
        xz_enc = torch.nn.functional.binary_cross_entropy_with_logits(lg["xz_enc"], torch.zeros(4))
        cycle = real_fake_loss(lg["xx_fake"], lg["xx_real"]) + real_fake_loss(lg["zz_fake"], lg["zz_real"])
        loss = {"G": xz_gen + cycle, "E": xz_enc + cycle, "sum": xz_gen + xz_enc + cycle}[which]
        net = det.generator if which == "G" else det.encoder
        params = list(net.parameters()) if which != "sum" else [*det.encoder.parameters(), *det.generator.parameters()]
        return torch.autograd.grad(loss, params)

    n_enc = len(list(det.encoder.parameters()))
    both = grads("sum")
    for a, b in zip(grads("E"), both[:n_enc]):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads("G"), both[n_enc:]):
        torch.testing.assert_close(a, b)
    # and the task's loss is that sum
    torch.manual_seed(0)
    loss, logs = task.loss("generator", {"x": x})
    assert loss.item() == pytest.approx(logs["G/xz"] + logs["G/cycle_x"] + logs["G/cycle_z"], rel=1e-5)


# -- detector ----------------------------------------------------------------------------------
def test_the_ema_copies_score_and_are_saved(tmp_path):
    # fit, score and save -> load are checked for every method in test_conformance.py
    det = tiny().fit(blobs(12, seed=1), work_dir=tmp_path / "run", progress=False)
    assert det.scoring["encoder"] is not det.encoder
    saved = det.state_tensors()
    assert all(torch.equal(saved[f"encoder.{k}"], v) for k, v in det.scoring["encoder"].state_dict().items())
    assert (tmp_path / "run" / "losses.csv").read_text().startswith("step,")


def test_image_size_and_empty_set_errors():
    with pytest.raises(ScanomalyError, match="image_size"):
        ALAD.from_profile("tiny", preprocessing_overrides={"image_size": 48})
    with pytest.raises(ScanomalyError, match="at least one"):
        tiny().fit(torch.zeros(0, 1, 32, 32))


def test_tiny_end_to_end_on_real_chest_xrays():
    if not REAL_NORMALS.is_dir():
        pytest.skip(f"real chest X-rays not found at {REAL_NORMALS} (expected ../shared/data beside the repository)")
    det = tiny()
    files = sorted(REAL_NORMALS.glob("*.png"))[:24]
    images = load_images([ImageRecord(str(f)) for f in files], det.preprocessing, progress=False)
    assert len(images) == 24
    det.fit(images.subset(range(16)), progress=False)
    scores, maps = det.score(images.subset(range(16, 24)))
    assert scores.shape == (8,) and maps.shape == (8, 32, 32)
    assert np.isfinite(scores).all() and np.isfinite(maps).all() and (scores >= 0).all()
