"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): AnoGAN with the slow per-image latent
search replaced by an encoder trained once, so that scoring is one forward pass.

    stage 1, WGAN-GP on healthy images (Gulrajani et al. 2017), z ~ N(0, I_128):
        critic:     D(G(z)) − D(x) + λ_GP·(‖∇_x̂ D(x̂)‖₂ − 1)²        λ_GP = 10, 5 critic steps
        generator:  −D(G(z))                                          per generator step
        networks:   residual up/down blocks (nn/wgan_resnet.py); f(x) = the critic's flattened
                    last feature map, the input of its final linear layer
    stage 2, izi_f encoder training (G and D frozen):
        L(x) = 1/n·‖x − G(E(x))‖² + κ/n_d·‖f(x) − f(G(E(x)))‖²        κ = 1
        (n pixels, n_d features: both terms are mean squared errors)
    score:  A(x) = the same sum, per image, in one forward pass;  heatmap |x − G(E(x))|

Both stages run through the generic GAN loop: stage 1 is a two-phase task (the critic every
iteration, the generator every 5th: one loop iteration is one critic step, so `iterations` counts
critic steps and the generator takes iterations/5 steps); stage 2 is a one-phase task whose only
module is the encoder. G and D stay outside stage 2's modules, so the loop never sets them to train
mode (their BatchNorm statistics would drift) and its checkpoints hold only the encoder. Each stage
resumes from its own folder, work_dir/stage1 and work_dir/stage2; a finished stage 1 is reloaded,
not retrained.

What differs from the paper / official code, and why:
- The encoder has exactly the critic's body, LayerNorm included, where the official code's encoder
  uses BatchNorm; LayerNorm has no train/eval difference, so an image scores the same in any batch.
- The encoder ends in tanh (this project's specification); the official code's default has no
  output activation (Z_REG_TYPE = None), `encoder_tanh = False` gives that. With z ~ N(0, I), tanh
  keeps E(x) in the high-density core of the prior, which G has seen most.
- The official code trains the WGAN for 7 epochs of its OCT patch set; the paper profile fixes
  100k generator steps (500k critic steps), and 50k encoder steps (the official ITERS_ENC).
- Widths scale with `width` (d = 64 in the paper) and the number of blocks with the image size.
- The cpu profile is far shorter and narrower (d = 8, batch 32, 700 generator steps), lets the
  learning rates decay linearly over the last quarter of each stage, and flips images
  horizontally; the paper profile keeps constant rates and no augmentation, as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..detector import anomaly_map, register
from ..errors import ScanomalyError
from ..distributed import per_sample_randn
from ..nn.blocks import gradient_penalty
from ..nn.wgan_resnet import ResNetCritic, ResNetGenerator
from ..training.loop import GANTask, LoopConfig, Phase
from ._gan import GANDetector

# Memory format of the networks and their inputs. Measured on the shared 2-core CPU (2026-12-02, one thread, load ~5,
# cpu profile): scoring 64 images took 2.5 / 1.3 s in channels_last against 3.8 / 1.7 s without; training speed was
# within the noise. It is a per-network choice: HealthyGAN's networks trained 5.8x slower in it (BENCHMARKS.md).
CHANNELS_LAST = torch.channels_last


# ---------------------------------------------------------------------------------------------
# networks: nn/wgan_resnet.py. These build the three of one model from a config.
# ---------------------------------------------------------------------------------------------
def build_networks(cfg: "FAnoGANConfig", channels: int, image_size: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    generator = ResNetGenerator(cfg.latent_dim, channels, image_size, cfg.width)
    critic = ResNetCritic(channels, image_size, cfg.width)
    encoder = ResNetCritic(channels, image_size, cfg.width, out_features=cfg.latent_dim, tanh=cfg.encoder_tanh)
    return tuple(m.to(memory_format=CHANNELS_LAST) for m in (generator, critic, encoder))


def sample_latent(n: int, dim: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ N(0, I), the paper's prior (a seeded generator for fixed samples; else drawn so that
    distributed ranks draw what one process would, see `scanomaly.distributed`)."""
    if generator is not None:
        return torch.randn(n, dim, generator=generator, device=device)
    return per_sample_randn(n, dim, device=device)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, gp: torch.Tensor, lambda_gp: float) -> torch.Tensor:
    """WGAN-GP critic: D(G(z)) − D(x) + λ·GP (the negative Wasserstein estimate, penalised)."""
    return fake_scores.mean() - real_scores.mean() + lambda_gp * gp


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def izif_loss(x, reconstruction, features_x, features_reconstruction, kappa: float) -> torch.Tensor:
    """Per image: mean (x − G(E(x)))² + κ·mean (f(x) − f(G(E(x))))²  ->  [N].

    The training loss of the encoder (averaged over the batch) and the anomaly score A(x)."""
    residual = (x - reconstruction).pow(2).flatten(1).mean(1)
    features = (features_x - features_reconstruction).pow(2).flatten(1).mean(1)
    return residual + kappa * features


class IzifScorer(nn.Module):
    """Scoring as one forward pass: x -> (G(E(x)), A(x)), A the izi_f loss per image. What the
    detector scores with, and what `scanomaly export` writes to ONNX."""

    def __init__(self, encoder: ResNetCritic, generator: ResNetGenerator, critic: ResNetCritic, kappa: float):
        super().__init__()
        self.encoder, self.generator, self.critic, self.kappa = encoder, generator, critic, kappa

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.generator(self.encoder(x))
        fx, fr = self.critic.features(x), self.critic.features(reconstruction)
        # float: under bf16 autocast the score is still computed in float32
        reconstruction = reconstruction.float()
        return reconstruction, izif_loss(x, reconstruction, fx.float(), fr.float(), self.kappa)


# ---------------------------------------------------------------------------------------------
# training tasks: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class WGANGPTask(GANTask):
    """Stage 1: the critic every iteration, the generator every `n_critic` iterations."""

    def __init__(self, generator: ResNetGenerator, critic: ResNetCritic, cfg: "FAnoGANConfig"):
        self.generator, self.critic, self.cfg = generator, critic, cfg
        betas = tuple(float(b) for b in cfg.betas)  # Adam refuses a mix of int and float
        self._optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=betas),
            "critic": torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=betas),
        }
        self.fixed_z = sample_latent(8, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))

    def modules(self):
        return {"generator": self.generator, "critic": self.critic}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [
            Phase("critic", optimizer="critic", modules=("critic",), every=1),
            Phase("generator", optimizer="generator", modules=("generator",), every=self.cfg.n_critic),
        ]

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(sample_latent(len(x), self.cfg.latent_dim, device=x.device))

    def loss(self, phase, batch):
        x = batch["x"]
        if phase == "critic":
            with torch.no_grad():
                fake = self._fake(x)
            real_scores, fake_scores = self.critic(x), self.critic(fake)
            gp = gradient_penalty(self.critic, x, fake)
            loss = critic_loss(real_scores, fake_scores, gp, self.cfg.lambda_gp)
            return loss, {"D/wasserstein": (real_scores.mean() - fake_scores.mean()).item(), "D/gp": gp.item()}
        loss = generator_loss(self.critic(self._fake(x)))
        return loss, {"G/loss": loss.item()}

    def sample_rows(self, batch, nets):
        return [("real", batch["x"][:8]), ("generated", nets["generator"](self.fixed_z.to(batch["x"].device)))]


class EncoderTask(GANTask):
    """Stage 2 (izi_f): one phase, the encoder; G and D are frozen and kept out of `modules()`."""

    def __init__(self, encoder: ResNetCritic, generator: ResNetGenerator, critic: ResNetCritic, cfg: "FAnoGANConfig"):
        self.encoder, self.generator, self.critic, self.cfg = encoder, generator, critic, cfg
        for frozen in (generator, critic):
            frozen.eval().requires_grad_(False)
        self._optimizers = {"encoder": torch.optim.RMSprop(encoder.parameters(), lr=cfg.encoder_lr)}

    def modules(self):
        return {"encoder": self.encoder}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [Phase("encoder", optimizer="encoder", modules=("encoder",))]

    def loss(self, phase, batch):
        x = batch["x"]
        reconstruction = self.generator(self.encoder(x))
        with torch.no_grad():
            features_x = self.critic.features(x)
        per_image = izif_loss(x, reconstruction, features_x, self.critic.features(reconstruction), self.cfg.kappa)
        residual = (x - reconstruction).pow(2).mean()
        return per_image.mean(), {"E/izif": per_image.mean().item(), "E/residual": residual.item()}

    def sample_rows(self, batch, nets):
        x = batch["x"][:8]
        reconstruction = self.generator(nets["encoder"](x))  # G is frozen in this stage
        return [("input", x), ("G(E(x))", reconstruction), ("difference", anomaly_map(x, reconstruction)[:, None])]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class FAnoGANConfig(LoopConfig):
    latent_dim: int = 128
    width: int = 64  # d: the generator runs 8d, 8d, 4d, 2d, d; critic and encoder d, 2d, 4d, 8d, 8d
    # stage 1: WGAN-GP
    iterations: int = 500_000  # critic steps; the generator takes iterations / n_critic steps
    batch_size: int = 64
    n_critic: int = 5
    lr: float = 1e-4
    betas: tuple = (0.0, 0.9)
    lambda_gp: float = 10.0
    lr_decay_fraction: float = 0.0  # the official code: constant learning rate (both stages)
    ema_decay: float = 0.0  # no EMA: the trained networks score
    # stage 2: izi_f encoder
    encoder_iterations: int = 50_000
    encoder_lr: float = 5e-5  # RMSProp
    kappa: float = 1.0
    encoder_tanh: bool = True
    hflip: bool = False
    checkpoint_every: int = 5000
    sample_every: int = 5000


@register
class FAnoGAN(GANDetector):
    name = "fanogan"
    scoring_networks = ("generator", "critic", "encoder")  # E and G reconstruct, D gives f
    Config = FAnoGANConfig
    profiles = {
        # the paper: 64 x 64 grayscale, d = 64, 100k generator steps, 50k encoder steps (GPU)
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # ~25 minutes on 2 CPU cores at 64 px, both stages. Measured on one core: 0.57 CPU-s per
        # stage-1 iteration (a critic step with its gradient penalty, plus a fifth of a generator
        # step) and 0.33 per encoder step at d = 8, batch 32; d = 16 costs 2-3x more, batch 64 2.3x.
        # So 3500 critic steps (700 generator steps, ~20 min at ~3 it/s on two cores) and 1500
        # encoder steps (~5 min). The encoder keeps the paper's RMSProp 5e-5: 2e-4 lowered the
        # held-out healthy izif loss by only 3% after 300 steps, and 1e-3 saturated the tanh.
        "cpu": {
            "config": {
                "width": 8,
                "batch_size": 32,
                "iterations": 3500,
                "encoder_iterations": 1500,
                "lr_decay_fraction": 0.25,
                "hflip": True,
                "checkpoint_every": 250,
                "sample_every": 500,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests and smoke runs
        "tiny": {
            "config": {
                "latent_dim": 16,
                "width": 4,
                "iterations": 20,
                "encoder_iterations": 10,
                "batch_size": 8,
                "checkpoint_every": 10,
                "sample_every": 10,
            },
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        if c.n_critic < 1:
            raise ScanomalyError(f"n_critic must be >= 1, got {c.n_critic}")
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        self.generator, self.critic, self.encoder = (m.to(self.device) for m in build_networks(c, p.channels, p.image_size))
        self.encoder_result = None  # stage 2's (train_result: stage 1's)

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True):
        x = self._healthy_tensor(healthy)
        c = self.config
        stage_dir = (lambda name: None) if work_dir is None else (lambda name: Path(work_dir) / name)  # noqa: E731
        sample = {"x": x[:8]}

        # stage 1: the WGAN-GP (reloaded, not retrained, when work_dir/stage1 holds a finished run)
        self.generator.train().requires_grad_(True)
        self.critic.train().requires_grad_(True)
        self.train_result = self._train(WGANGPTask(self.generator, self.critic, c), {"x": x}, stage_dir("stage1"),
                                        progress, sample_batch=sample)

        # stage 2: the encoder, against the frozen G and D; its own iterations and seed, the same other settings
        self.encoder_result = self._train(
            EncoderTask(self.encoder, self.generator, self.critic, c), {"x": x}, stage_dir("stage2"), progress,
            config=replace(c, iterations=c.encoder_iterations, seed=c.seed + 1), sample_batch=sample,
        )
        return self

    def _ready_to_score(self) -> None:
        self._eval()

    def _eval(self) -> None:
        for m in (self.generator, self.critic, self.encoder):
            m.eval().requires_grad_(False)

    # -- score: one forward pass ------------------------------------------------------------------
    def scoring_network(self) -> IzifScorer:
        return IzifScorer(self.encoder, self.generator, self.critic, self.config.kappa)

    # -- persistence (GANDetector): all three networks score --------------------------------------------
    def extra_state(self):
        out = {}
        for stage, r in (("stage1", self.train_result), ("stage2", self.encoder_result)):
            if r is not None:
                out[stage] = {"steps": r.steps, "iterations_per_second": r.iterations_per_second}
        return out
