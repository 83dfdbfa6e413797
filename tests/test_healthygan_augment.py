"""HealthyGAN's `critic_augment` (DiffAugment's translation and cutout, `nn.blocks.diff_augment`): each transform does
what it says per scan, gradients pass through it, no policy leaves scans and the random stream untouched, the critic
never sees a scan as it is once a policy is set, an unknown name is a clear error."""

from __future__ import annotations

import pytest
import torch

from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGAN, HealthyGANTask
from scanomaly.nn.blocks import augment_policy, diff_augment

from conftest import blobs


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img [h, w] moved down by dy and right by dx, the uncovered border black (-1)."""
    h, w = img.shape
    out = torch.full_like(img, -1.0)
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = img[max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)]
    return out


def test_translation_moves_each_scan_by_whole_pixels_within_an_eighth_with_a_black_border():
    torch.manual_seed(0)
    x = blobs(32, size=16, seed=3)
    y = diff_augment(x, ("translation",))
    shifts = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(y[i, 0], shifted(x[i, 0], dy, dx))]
        assert len(found) == 1, f"scan {i} is not one shifted copy of its input"
        shifts.append(found[0])
    assert len(set(shifts)) > 5  # drawn per scan, not one shift for the batch


def test_cutout_zeroes_one_square_of_half_the_size_per_scan():
    torch.manual_seed(0)
    x = torch.ones(64, 1, 16, 16)
    y = diff_augment(x, ("cutout",))
    for i in range(len(x)):
        rows, cols = torch.nonzero(y[i, 0] == 0, as_tuple=True)
        assert len(rows) > 0
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert len(rows) == h * w and h <= 8 and w <= 8  # one rectangle, at most half the side (clipped at the border)
    assert sum(int((y[i] == 0).sum()) == 64 for i in range(len(x))) > 10  # whole 8 x 8 squares where fully inside


def test_gradients_pass_through_the_augmentation_to_the_pixels_that_stay_in_view():
    torch.manual_seed(1)
    x = blobs(8, size=16, seed=4).requires_grad_(True)
    y = diff_augment(x, ("translation", "cutout"))
    y.sum().backward()
    grad = x.grad
    assert set(grad.unique().tolist()) <= {0.0, 1.0}  # each input pixel lands on at most one output pixel
    kept = (grad == 1).flatten(1).sum(1)
    assert (kept >= 16 * 16 - 8 * 8 - 2 * 2 * 16).all() and (kept < 16 * 16).all()


def test_no_policy_returns_the_scans_and_draws_no_random_numbers():
    x = blobs(4, size=16)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert diff_augment(x, ()) is x
    assert torch.equal(torch.get_rng_state(), before)


def test_policy_names_are_read_and_unknown_ones_refused():
    assert augment_policy("translation, cutout") == ("translation", "cutout")
    assert augment_policy("") == ()
    with pytest.raises(ScanomalyError, match="unknown augmentation 'color'"):
        augment_policy("translation,color")
    with pytest.raises(ScanomalyError, match="augmentation"):
        HealthyGAN.from_profile("tiny", {"critic_augment": "flip"})


@pytest.mark.parametrize("policy", ["", "translation,cutout"])
def test_the_critic_sees_scans_as_they_are_only_without_a_policy(policy):
    xb, xa = blobs(8, seed=1), blobs(8, seed=2)
    det = HealthyGAN.from_profile("tiny", {"critic_augment": policy, "selection": "last", "iterations": 2})
    task = HealthyGANTask(det.generator, det.critic, det.config)
    seen = []
    # the critic's convolutions (what it judges; for the paper's critic, the pixels it is shown)
    task.critic.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    task.loss("critic", {"a": xa[:4], "b": xb[:4]})
    real = seen[0]  # the critic's first look: the healthy batch
    assert torch.equal(real, xb[:4]) == (policy == "")
    seen.clear()
    task.loss("generator", {"a": xa[:4], "b": xb[:4]})
    healthy_a = det.generator(xa[:4])[0].detach()
    assert torch.allclose(seen[0], healthy_a) == (policy == "")
