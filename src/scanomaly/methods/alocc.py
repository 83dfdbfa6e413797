"""ALOCC: Adversarially Learned One-Class Classifier (Sabokrou, Khalooei, Fathy & Adeli, CVPR 2018):
a denoising reconstructor R and a discriminator D trained against each other on healthy images
only; at the end D has learnt what a (reconstructed) healthy image looks like.

    X̃ = X + η,  η ~ N(0, σ²I)                                (σ = 0.155 in [0, 1] intensity units)
    R: X̃ → X' (convolutional encoder-decoder),  D: image → probability of "healthy"
    losses (every iteration, D first), from logits:
        D   BCE(D(X), 1) + BCE(D(R(X̃)), 0)
        R   BCE(D(R(X̃)), 1) + λ·mean (X − R(X̃))²,  λ = 0.4     (adversarial + reconstruction L_R)
    score:  1 − D(R(X))  (the paper's; `score_mode="input"` gives its alternative 1 − D(X));
            heatmap |X − R(X)|

Our images are in [-1, 1], twice the paper's [0, 1] range, so the noise added is 2σ.

Networks follow the public code (github.com/khalooei/ALOCC-CVPR2018, TensorFlow, 5x5 kernels):
R's encoder is three conv5x5/2 + BN + LeakyReLU(0.2) layers of widths 2w, 4w, 8w; its decoder two
transposed conv5x5/2 + BN + ReLU layers of widths 2g, g and a transposed conv5x5/2 to the image
with tanh; D is four conv5x5/2 layers of widths w, 2w, 4w, 8w (BN from the second on, LeakyReLU
0.2) and a linear logit. The code's w = g = 16. These stacks have their own 5x5 kernels, so they are
written here rather than taken from the DCGAN stacks of `nn.blocks` (4x4 kernels). Any image size
that is a multiple of 16 works (the code ran 28 px MNIST digits and 45 px UCSD patches).

What differs from the paper and the code, and why:
- optimiser: the code uses RMSProp at lr 2e-3 (its flag's help text says Adam); we use DCGAN's
  Adam (2e-4, β1 0.5), which ALOCC's DCGAN-derived networks were designed for, as for the other
  GAN methods in scanomaly;
- the code's refinement loss is BCE(R(X̃), X) with weight 0.2, the paper's is λ‖X − X'‖² with
  λ = 0.4: we follow the paper;
- the code steps R twice per D step ("different from paper", its comment); we step once;
- initial weights use DCGAN's N(0, 0.02) (`nn.blocks.dcgan_init`); convs followed by BatchNorm
  have no bias;
- scores are computed as sigmoid(−logit) in float64, so that saturated discriminators still rank
  images instead of returning ties at exactly 0 or 1;
- the cpu profile decays the learning rate linearly to 0 over its last quarter (the shared loop's
  option), so that a short run ends on settled weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..detector import anomaly_map, register
from ..distributed import per_sample_randn
from ..errors import ScanomalyError
from ..nn.blocks import dcgan_init
from ..training.loop import GANTask, LoopConfig, Phase
from ._gan import GANDetector

SCORE_MODES = ("reconstructed", "input")


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
def _down(ch_in: int, ch_out: int, norm: bool) -> list[nn.Module]:
    """conv5x5/2 ('same' padding: halves the size) [+ BN] + LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(ch_in, ch_out, 5, 2, 2, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(ch_out))
    return layers + [nn.LeakyReLU(0.2, inplace=True)]


def _up(ch_in: int, ch_out: int) -> nn.ConvTranspose2d:
    """transposed conv5x5/2 that exactly doubles the size (TensorFlow's 'same' deconvolution)."""
    return nn.ConvTranspose2d(ch_in, ch_out, 5, 2, 2, output_padding=1, bias=False)


class Reconstructor(nn.Module):
    """R: [N, C, S, S] -> [N, C, S, S] in [-1, 1] through an S/8 bottleneck."""

    def __init__(self, channels: int, width: int = 16, decoder_width: int = 16):
        super().__init__()
        w, g = width, decoder_width
        self.encoder = nn.Sequential(*_down(channels, 2 * w, True), *_down(2 * w, 4 * w, True), *_down(4 * w, 8 * w, True))
        self.decoder = nn.Sequential(
            _up(8 * w, 2 * g), nn.BatchNorm2d(2 * g), nn.ReLU(inplace=True),
            _up(2 * g, g), nn.BatchNorm2d(g), nn.ReLU(inplace=True),
            _up(g, channels), nn.Tanh(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Discriminator(nn.Module):
    """D: four conv5x5/2 layers (no BN on the first) and a linear logit. forward returns logits [N];
    `probability` is the paper's D(X) = sigmoid(logit)."""

    def __init__(self, channels: int, image_size: int, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_down(channels, w, False), *_down(w, 2 * w, True), *_down(2 * w, 4 * w, True), *_down(4 * w, 8 * w, True)
        )
        self.head = nn.Linear(8 * w * (image_size // 16) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).flatten()

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def add_noise(x: torch.Tensor, noise_std01: float) -> torch.Tensor:
    """X̃ = X + η, η ~ N(0, σ²); σ is given in [0, 1] units, our images span [-1, 1]: 2σ here."""
    return x + (2.0 * noise_std01) * per_sample_randn(len(x), *x.shape[1:], device=x.device, dtype=x.dtype)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE(D(X), 1) + BCE(D(R(X̃)), 0), summed as in the code."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return real + fake


def adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """R wants D to call its reconstructions healthy: BCE(D(R(X̃)), 1)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """L_R = mean (X − X')²: R must also denoise, not only fool D."""
    return ((x - x_rec) ** 2).mean()


def one_minus_d(logits: torch.Tensor) -> torch.Tensor:
    """1 − D = 1 − sigmoid(logit) = sigmoid(−logit), in float64 (no ties where D saturates)."""
    return torch.sigmoid(-logits.double())


class DiscriminatorScorer(nn.Module):
    """Scoring as one forward pass: x -> (R(x), 1 − D(R(x)) or 1 − D(x)). What the detector scores
    with, and what `scanomaly export` writes to ONNX."""

    def __init__(self, reconstructor: Reconstructor, discriminator: Discriminator, score_mode: str):
        super().__init__()
        self.reconstructor, self.discriminator, self.score_mode = reconstructor, discriminator, score_mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_rec = self.reconstructor(x)
        logits = self.discriminator(x_rec if self.score_mode == "reconstructed" else x)
        return x_rec.float(), one_minus_d(logits.float())



# ---------------------------------------------------------------------------------------------
# training task: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class ALOCCTask(GANTask):
    ema_modules = ("reconstructor", "discriminator")  # used only when ema_decay > 0

    def __init__(self, reconstructor: Reconstructor, discriminator: Discriminator, cfg: "ALOCCConfig"):
        self.reconstructor, self.discriminator, self.cfg = reconstructor, discriminator, cfg
        self._optimizers = {
            "reconstructor": torch.optim.Adam(reconstructor.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
            "discriminator": torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
        }

    def modules(self):
        return {"reconstructor": self.reconstructor, "discriminator": self.discriminator}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [
            Phase("discriminator", optimizer="discriminator", modules=("discriminator",)),
            Phase("reconstructor", optimizer="reconstructor", modules=("reconstructor",)),
        ]

    def loss(self, phase, batch):
        x, cfg = batch["x"], self.cfg
        noisy = add_noise(x, cfg.noise_std)
        if phase == "discriminator":
            with torch.no_grad():
                x_rec = self.reconstructor(noisy)
            logits_real, logits_fake = self.discriminator(x), self.discriminator(x_rec)
            loss = discriminator_loss(logits_real, logits_fake)
            return loss, {
                "D/loss": loss.item(),
                "D/real": torch.sigmoid(logits_real).mean().item(),
                "D/fake": torch.sigmoid(logits_fake).mean().item(),
            }

        x_rec = self.reconstructor(noisy)
        adv, rec = adversarial_loss(self.discriminator(x_rec)), reconstruction_loss(x, x_rec)
        return adv + cfg.lambda_rec * rec, {"R/adv": adv.item(), "R/rec": rec.item()}

    def sample_rows(self, batch, nets):
        x = batch["x"]
        x_rec = nets["reconstructor"](x)
        return [("input", x), ("R(x)", x_rec), ("difference", anomaly_map(x, x_rec)[:, None])]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class ALOCCConfig(LoopConfig):
    width: int = 16  # D: w, 2w, 4w, 8w; R's encoder: 2w, 4w, 8w (the code's df_dim)
    decoder_width: int = 16  # R's decoder: 2g, g (the code's gf_dim)
    noise_std: float = 0.155  # σ of the training noise, in [0, 1] intensity units
    lambda_rec: float = 0.4  # λ, the weight of L_R
    # the code's amount of training: 40 epochs of one MNIST digit (~6,000 images) at batch 128
    iterations: int = 1875
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    score_mode: str = "reconstructed"  # "reconstructed": 1 − D(R(x)) (the paper's); "input": 1 − D(x)
    lr_decay_fraction: float = 0.0  # the paper keeps the learning rate constant
    ema_decay: float = 0.0  # 0: score with the raw networks, as the paper does
    hflip: bool = False  # the paper does not augment; a flipped chest X-ray is not a healthy one


@register
class ALOCC(GANDetector):
    name = "alocc"
    scoring_networks = ("reconstructor", "discriminator")  # D scores R's reconstruction
    Config = ALOCCConfig
    profiles = {
        # the code's widths and batch; 32 px grayscale, the power of two nearest its 28 px MNIST
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 32, "channels": 1},
        },
        # ~30 minutes on 2 CPU cores: the code's networks and batch at 64 px; measured 1.1 it/s on
        # one (shared) core, so ~1.8 it/s on two: 3000 iterations ≈ 27 minutes
        "cpu": {
            "config": {
                "iterations": 3000,
                "lr_decay_fraction": 0.25,
                "checkpoint_every": 500,
                "sample_every": 500,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests and smoke runs
        "tiny": {
            "config": {
                "width": 4,
                "decoder_width": 4,
                "iterations": 20,
                "batch_size": 4,
                "checkpoint_every": 10,
                "sample_every": 10,
            },
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        if c.score_mode not in SCORE_MODES:
            raise ScanomalyError(f"alocc: score_mode must be one of {SCORE_MODES}, got {c.score_mode!r}")
        if p.image_size % 16:
            raise ScanomalyError(f"alocc: image_size must be a multiple of 16, got {p.image_size}")
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        self.reconstructor = Reconstructor(p.channels, c.width, c.decoder_width).to(self.device)
        self.discriminator = Discriminator(p.channels, p.image_size, c.width).to(self.device)
        dcgan_init(self.reconstructor)
        dcgan_init(self.discriminator)

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True):
        """Train on healthy images only (`unlabeled` is not used by this one-class method)."""
        x = self._healthy_tensor(healthy)
        task = ALOCCTask(self.reconstructor, self.discriminator, self.config)
        self.train_result = self._train(task, {"x": x}, work_dir, progress, sample_batch={"x": x[:8]})
        return self

    # -- score -------------------------------------------------------------------------------
    def scoring_network(self) -> DiscriminatorScorer:
        return DiscriminatorScorer(self.scoring["reconstructor"], self.scoring["discriminator"], self.config.score_mode)

    # persistence (GANDetector): both networks are saved
