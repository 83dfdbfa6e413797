"""Building blocks shared by the GAN methods, written once.

- `ResidualBlock`: conv3x3-IN-ReLU-conv3x3-IN plus the input (StarGAN / HealthyGAN).
- `dcgan_encoder` / `dcgan_decoder`: the DCGAN stacks (conv4x4 stride 2 + BN + LeakyReLU down,
  transposed conv4x4 + BN + ReLU up) used by AnoGAN, GANomaly, ALAD and ALOCC.
- `gradient_penalty`: WGAN-GP's penalty on random interpolates (Gulrajani et al. 2017).
- `EMA`: an exponential moving average of a module's weights, used for scoring.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ..distributed import per_sample_rand


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm=nn.InstanceNorm2d, padding_mode: str = "zeros"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode=padding_mode),
            norm(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode=padding_mode),
            norm(channels, affine=True),
        )

    def forward(self, x):
        return x + self.body(x)


def num_halvings(image_size: int, final_size: int = 4) -> int:
    """How many stride-2 layers take `image_size` down to `final_size` (image sizes are powers of two)."""
    n = int(round(math.log2(image_size / final_size)))
    if n < 1 or final_size * 2**n != image_size:
        raise ValueError(f"image size {image_size} must be {final_size} times a power of two")
    return n


def dcgan_encoder(
    in_channels: int,
    out_features: int,
    image_size: int,
    width: int = 64,
    max_width: int = 512,
    norm: str = "batch",
    final_bias: bool = False,
) -> nn.Sequential:
    """DCGAN discriminator/encoder body: [N, C, S, S] -> [N, out_features, 1, 1].

    conv4x4/2 + LeakyReLU(0.2) (no norm on the first layer, as in DCGAN), then conv4x4/2 + norm +
    LeakyReLU until 4x4, then a 4x4 valid conv to `out_features`.
    `features(x)` of a discriminator is everything but this last conv: `body[:-1]`.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    ch = width
    for _ in range(num_halvings(image_size) - 1):
        nxt = min(ch * 2, max_width)
        layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), _norm(norm, nxt), nn.LeakyReLU(0.2, inplace=True)]
        ch = nxt
    layers.append(nn.Conv2d(ch, out_features, 4, 1, 0, bias=final_bias))
    return nn.Sequential(*layers)


def dcgan_decoder(
    in_features: int, out_channels: int, image_size: int, width: int = 64, max_width: int = 512
) -> nn.Sequential:
    """DCGAN generator/decoder: [N, in_features, 1, 1] -> [N, C, S, S] in [-1, 1] (tanh)."""
    n = num_halvings(image_size)
    widths = [min(width * 2**i, max_width) for i in range(n)][::-1]  # e.g. 512, 256, 128, 64
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(in_features, widths[0], 4, 1, 0, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean over the batch of (||∇_x̂ D(x̂)||₂ − 1)² at x̂ = α·real + (1−α)·fake, one α per sample.

    Computed in float32 outside autocast: the penalty's second-order gradients are fragile in
    half precision. `create_graph=True` so the penalty itself is differentiated w.r.t. the critic.
    """
    device_type = real.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        alpha = per_sample_rand(real.size(0), 1, 1, 1, device=real.device)  # distributed-safe torch.rand
        x_hat = (alpha * real.float() + (1 - alpha) * fake.detach().float()).requires_grad_(True)
        out = critic(x_hat)
        (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    GAN generators oscillate; averaging their weights over the last few hundred steps gives a
    smoother, usually better model for scoring (Yazıcı et al. 2019). The decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, so that early checkpoints are not dominated
    by the random initial weights.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
