"""GANomaly (Akcay, Atapour-Abarghouei & Breckon, ACCV 2018): an autoencoder whose reconstruction
is encoded a second time; a healthy image and its reconstruction land at the same latent code,
an anomalous one does not.

    generator:      z = G_E(x),  x̂ = G_D(z),  ẑ = E(x̂)          (encoder → decoder → encoder)
    discriminator:  D(x) = sigmoid(head(f(x))),  f = everything but D's last conv
    losses (both every iteration, generator first):
        generator      w_adv·L_adv + w_con·L_con + w_enc·L_enc,  weights 1, 50, 1
            L_adv = mean (f(x) − f(x̂))²                       (feature matching)
            L_con = mean |x − x̂|                               (contextual: look like the input)
            L_enc = mean (z − ẑ)²                              (encoder: same code again)
        discriminator  BCE(D(x), 1) + BCE(D(x̂), 0), halved; re-initialised (DCGAN init) whenever
                       this loss falls below 1e-5, i.e. D has won outright and gives no gradient
    score:  A(x) = mean over the latent dimensions of (z − ẑ)²;  heatmap |x − x̂|

Networks are the DCGAN stacks of `nn.blocks` (conv4x4/2 + BN + LeakyReLU(0.2) down, transposed
conv4x4/2 + BN + ReLU up, tanh out), latent size 100, base width 64, no biases: exactly the
official code's `Encoder` / `Decoder` / `NetD` (image size a power of two, at least 16).

What differs from the official code, and why:
- scoring runs the networks in eval mode (BatchNorm running statistics); the official test keeps
  train mode, so an image's score depends on the other images in its batch;
- the official code min-max normalises the scores over the test set and keeps the epoch with the
  best *test* AUC; we return raw scores (the same ranking) and the last iteration's weights;
- the discriminator's loss is computed from logits (BCE-with-logits: the same value, but safe under
  mixed precision); `Discriminator.probability` is the paper's sigmoid output;
- optional, off by default and in the paper profile: a linear learning-rate decay at the end and
  an EMA of the generator, both from the shared loop. The cpu profile uses the decay, because a
  short run keeps its last weights and a GAN's last step is otherwise a random point of its
  oscillation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..detector import anomaly_map, register
from ..errors import ScanomalyError
from ..nn.blocks import dcgan_decoder, dcgan_encoder, dcgan_init, num_halvings
from ..training.loop import GANTask, LoopConfig, Phase
from ._gan import GANDetector


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """G_E → G_D → E: returns (x̂, z, ẑ) with z, ẑ of shape [N, latent]."""

    def __init__(self, channels: int, image_size: int, latent: int = 100, width: int = 64, max_width: int = 512):
        super().__init__()
        self.encoder = dcgan_encoder(channels, latent, image_size, width, max_width)  # G_E
        self.decoder = dcgan_decoder(latent, channels, image_size, width, max_width)  # G_D
        self.reencoder = dcgan_encoder(channels, latent, image_size, width, max_width)  # E

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        x_hat = self.decoder(z)
        z_hat = self.reencoder(x_hat)
        return x_hat, z.flatten(1), z_hat.flatten(1)


class Discriminator(nn.Module):
    """The encoder's shape with one output: `features` is everything but the last conv (f(x) in
    L_adv), `head` is that conv. forward returns (logits [N], features)."""

    def __init__(self, channels: int, image_size: int, width: int = 64, max_width: int = 512):
        super().__init__()
        body = dcgan_encoder(channels, 1, image_size, width, max_width)
        self.features = body[:-1]
        self.head = body[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return self.head(feats).flatten(), feats

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) as in the paper: the sigmoid of the logit, the probability that x is real."""
        return torch.sigmoid(self(x)[0])


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def adversarial_loss(features_real: torch.Tensor, features_fake: torch.Tensor) -> torch.Tensor:
    """L_adv: mean squared difference of D's features of x and x̂ (feature matching)."""
    return ((features_real - features_fake) ** 2).mean()


def contextual_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L_con: mean |x − x̂| (L1 keeps reconstructions sharper than L2)."""
    return (x - x_hat).abs().mean()


def encoder_loss(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """L_enc: mean (z − ẑ)², the same quantity the score uses, learnt on healthy images only."""
    return ((z - z_hat) ** 2).mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """(BCE(D(x), 1) + BCE(D(x̂), 0)) / 2, from logits."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return (real + fake) / 2


def latent_score(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """A(x) = mean over latent dimensions of (z − ẑ)²: [N]."""
    return ((z - z_hat) ** 2).mean(1)


class LatentScorer(nn.Module):
    """Scoring as one forward pass: x -> (x̂, A(x)). What the detector scores with, and what
    `scanomaly export` writes to ONNX."""

    def __init__(self, generator: "Generator"):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, z, z_hat = self.generator(x)
        # float: under bf16 autocast the score is still computed in float32
        return x_hat.float(), latent_score(z.float(), z_hat.float())



# ---------------------------------------------------------------------------------------------
# training task: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class GANomalyTask(GANTask):
    ema_modules = ("generator",)

    def __init__(self, generator: Generator, discriminator: Discriminator, cfg: "GANomalyConfig"):
        self.generator, self.discriminator, self.cfg = generator, discriminator, cfg
        self._optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
            "discriminator": torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
        }
        self.reinitialisations = 0  # discriminator re-initialisations in this process
        self._fake = None  # (input, x̂) of the generator phase, reused by the discriminator phase

    def modules(self):
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        # the official order: the generator steps first; the discriminator then sees the x̂ that
        # the generator made before its step (no second generator pass)
        return [
            Phase("generator", optimizer="generator", modules=("generator",)),
            Phase("discriminator", optimizer="discriminator", modules=("discriminator",)),
        ]

    def loss(self, phase, batch):
        x, cfg = batch["x"], self.cfg
        if phase == "generator":
            x_hat, z, z_hat = self.generator(x)
            self._fake = (x, x_hat.detach())
            _, feats_real = self.discriminator(x)
            _, feats_fake = self.discriminator(x_hat)
            adv, con, enc = adversarial_loss(feats_real, feats_fake), contextual_loss(x, x_hat), encoder_loss(z, z_hat)
            loss = cfg.w_adv * adv + cfg.w_con * con + cfg.w_enc * enc
            return loss, {"G/adv": adv.item(), "G/con": con.item(), "G/enc": enc.item()}

        if self._fake is not None and self._fake[0] is x:
            x_hat = self._fake[1]
        else:  # called on its own (tests, or a task driven differently)
            with torch.no_grad():
                x_hat = self.generator(x)[0]
        self._fake = None
        logits_real, _ = self.discriminator(x)
        logits_fake, _ = self.discriminator(x_hat)
        loss = discriminator_loss(logits_real, logits_fake)
        return loss, {"D/loss": loss.item(), "D/real": torch.sigmoid(logits_real).mean().item(), "D/reinit": 0.0}

    def after_step(self, phase, logs):
        # GANomaly's rule: a discriminator whose loss has collapsed has won, and its saturated
        # output gives the generator nothing to learn from; start it afresh (Adam's moments are
        # kept, as in the official code)
        if phase == "discriminator" and logs["D/loss"] < self.cfg.reinit_threshold:
            dcgan_init(self.discriminator)
            self.reinitialisations += 1
            logs["D/reinit"] = 1.0  # the loop logs this dict after the hook: the CSV shows the rate

    def sample_rows(self, batch, nets):
        x = batch["x"]
        x_hat = nets["generator"](x)[0]
        return [("input", x), ("reconstruction", x_hat), ("difference", anomaly_map(x, x_hat)[:, None])]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class GANomalyConfig(LoopConfig):
    latent: int = 100
    width: int = 64
    max_width: int = 512  # the official widths double without a cap; at 32-64 px they stay <= 512
    # the paper's amount of training: 15 epochs (official `niter`) of CIFAR-10's 45,000 normal
    # training images at batch 64
    iterations: int = 10_500
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    reinit_threshold: float = 1e-5  # re-initialise D when its loss falls below this
    lr_decay_fraction: float = 0.0  # the paper keeps the learning rate constant
    ema_decay: float = 0.0  # 0: score with the raw generator, as the paper does
    hflip: bool = False  # the paper does not augment; a flipped chest X-ray is not a healthy one
    checkpoint_every: int = 1000
    sample_every: int = 1000


@register
class GANomaly(GANDetector):
    name = "ganomaly"
    scoring_networks = ("generator",)
    Config = GANomalyConfig
    profiles = {
        # the official defaults: 32 px, 3 channels (CIFAR-10), width 64, latent 100, batch 64
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 32, "channels": 3},
        },
        # ~30 minutes on 2 CPU cores: half the paper's width at 64 px, the paper's batch; measured
        # 1.0 it/s on one (shared) core, so ~1.7 it/s on two: 2800 iterations ≈ 27 minutes
        "cpu": {
            "config": {
                "width": 32,
                "max_width": 256,
                "iterations": 2800,
                "lr_decay_fraction": 0.25,
                "checkpoint_every": 500,
                "sample_every": 500,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests and smoke runs
        "tiny": {
            "config": {
                "latent": 16,
                "width": 8,
                "max_width": 32,
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
        _check_image_size(self.name, p.image_size)
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        self.generator = Generator(p.channels, p.image_size, c.latent, c.width, c.max_width).to(self.device)
        self.discriminator = Discriminator(p.channels, p.image_size, c.width, c.max_width).to(self.device)
        dcgan_init(self.generator)
        dcgan_init(self.discriminator)
        self.task = None

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True):
        """Train on healthy images only (`unlabeled` is not used by this one-class method)."""
        x = self._healthy_tensor(healthy)
        self.task = GANomalyTask(self.generator, self.discriminator, self.config)
        self.train_result = self._train(self.task, {"x": x}, work_dir, progress, sample_batch={"x": x[:8]})
        return self

    @property
    def scoring_generator(self) -> "Generator":
        """The generator that scores: the EMA copy after fit when ema_decay > 0, else the own one."""
        return self.scoring["generator"]

    # -- score -------------------------------------------------------------------------------
    def scoring_network(self) -> LatentScorer:
        return LatentScorer(self.scoring_generator)

    # -- persistence (GANDetector): the generator is the model; the discriminator is only needed to train
    def extra_state(self):
        out = super().extra_state()
        if out:
            out["discriminator_reinitialisations"] = self.task.reinitialisations
        return out


def _check_image_size(method: str, image_size: int) -> None:
    try:
        num_halvings(image_size)
    except ValueError:
        raise ScanomalyError(f"{method}: image_size must be 4 times a power of two (16, 32, 64, 128, ...), got {image_size}") from None

