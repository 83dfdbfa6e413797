"""ALAD: Adversarially Learned Anomaly Detection (Zenati, Romain, Foo, Lecouat & Chandrasekhar,
ICDM 2018): a bidirectional GAN whose encoder and generator are also trained to be each other's
inverse, judged by discriminators instead of pixel losses.

    encoder     E: x → z          generator  G: z → x,  z ~ N(0, I)
    D_xz        (x, E(x)) real  vs  (G(z), z) fake           (BiGAN / ALI)
    D_xx        (x, x) real     vs  (x, G(E(x))) fake         (cycle in image space, ALICE's
    D_zz        (z, z) real     vs  (z, E(G(z))) fake          conditional-entropy terms)
    losses (every iteration, discriminators first), BCE on logits:
        discriminators    BCE(real → 1) + BCE(fake → 0), for each of the three
        encoder+generator the same three losses with the labels swapped (non-saturating)
    spectral normalisation on the discriminators' layers (and on the encoder's, as in the code)
    score:  ‖f_xx(x, x) − f_xx(x, G(E(x)))‖₁, f_xx = D_xx's last hidden layer ("feature
            matching", the score the paper recommends);  heatmap |x − G(E(x))|
    scoring uses exponential moving averages (decay 0.999) of E, G and D_xx, as the code does.

Networks follow the official CIFAR-10 code (32 px): E and G are the DCGAN stacks of `nn.blocks`
with widths 128-256-512 and latent 100; D_xz's image path is E's body, its latent path two
512-wide layers, then a 1024-wide joint layer; D_xx is two conv5x5/2 layers (64, 128) on the
channel-concatenated pair; D_zz is 64-32 fully connected; LeakyReLU(0.2) and dropout 0.2 in the
discriminators; weights N(0, 0.01).

What differs from the official code, and why:
- D_xx gets one more conv5x5/2 layer per doubling of the image size above 32 px (its last map stays
  8x8, as at 32 px), and E, G and D_xz's image path follow the image size through the DCGAN stacks;
- the pair (x, x') is concatenated along channels (the code concatenates along image height);
- E's first layer has no BatchNorm and E's/D_xz's convolutions no biases (the shared DCGAN stack);
- the encoder and generator steps use the same batch as the discriminator step (the code draws a
  second one);
- the code stops early (patience 10 epochs on a healthy validation loss) and takes the number of
  epochs from the command line; we train a fixed number of iterations (see the profiles);
- the cpu profile decays the learning rate linearly to 0 over its last quarter (the shared loop's
  option; the code keeps it constant), so that a short run ends on settled weights.
Spectral norm is torch's parametrization (one power iteration per training forward, none in eval):
a saved model stores `...parametrizations.weight.original` and the power-iteration vectors `_u`,
`_v`, so it scores exactly as before saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ..detector import anomaly_map, register
from ..distributed import per_sample_randn
from ..errors import ScanomalyError
from ..nn.blocks import dcgan_decoder, dcgan_encoder, num_halvings
from ..training.loop import GANTask, LoopConfig, Phase
from ._gan import GANDetector


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """E: the DCGAN encoder stack, spectrally normalised except its last (latent) conv. [N, latent]."""

    def __init__(self, channels: int, image_size: int, latent: int = 100, width: int = 128, max_width: int = 512):
        super().__init__()
        self.net = dcgan_encoder(channels, latent, image_size, width, max_width)
        _init_normal(self.net)
        _spectral_normalise(self.net[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class Generator(nn.Module):
    """G: the DCGAN decoder stack, z [N, latent] -> x [N, C, S, S] in [-1, 1]."""

    def __init__(self, channels: int, image_size: int, latent: int = 100, width: int = 128, max_width: int = 512):
        super().__init__()
        self.net = dcgan_decoder(latent, channels, image_size, width, max_width)
        _init_normal(self.net)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class JointDiscriminator(nn.Module):
    """D_xz(x, z): image path (E's body down to 4x4), latent path (two layers), joint layer, logit.
    forward returns (logits [N], joint features)."""

    def __init__(self, channels, image_size, latent=100, width=128, max_width=512, joint_width=1024, dropout=0.2):
        super().__init__()
        self.x_path = dcgan_encoder(channels, 1, image_size, width, max_width)[:-1]
        x_features = min(width * 2 ** (num_halvings(image_size) - 1), max_width) * 4 * 4
        half = joint_width // 2
        self.z_path = nn.Sequential(
            nn.Linear(latent, half), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
            nn.Linear(half, half), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        )
        self.joint = nn.Sequential(nn.Linear(x_features + half, joint_width), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout))
        self.head = nn.Linear(joint_width, 1)
        _init_normal(self)
        _spectral_normalise(self.x_path, self.z_path, self.joint)  # not the logit layer, as in the code

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.joint(torch.cat([self.x_path(x).flatten(1), self.z_path(z)], 1))
        return self.head(feats).flatten(), feats


class ImageCycleDiscriminator(nn.Module):
    """D_xx(x, x'): conv5x5/2 + LeakyReLU + dropout, widths doubling from `width`, until the map is
    8x8 (two layers at 32 px, as in the code); the flattened last map is the feature f_xx the score
    compares. forward returns (logits [N], features [N, F])."""

    def __init__(self, channels: int, image_size: int, width: int = 64, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        ch_in, ch = 2 * channels, width
        for _ in range(num_halvings(image_size, final_size=8)):
            layers += [nn.Conv2d(ch_in, ch, 5, 2, 2), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout)]
            ch_in, ch = ch, ch * 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch_in * 8 * 8, 1)
        _init_normal(self)
        _spectral_normalise(self.features)

    def forward(self, x: torch.Tensor, x_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(torch.cat([x, x_other], 1)).flatten(1)
        return self.head(feats).flatten(), feats


class LatentCycleDiscriminator(nn.Module):
    """D_zz(z, z'): fully connected `width`, `width`/2, 1 with LeakyReLU and dropout."""

    def __init__(self, latent: int = 100, width: int = 64, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(2 * latent, width), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
            nn.Linear(width, width // 2), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        )
        self.head = nn.Linear(width // 2, 1)
        _init_normal(self)
        _spectral_normalise(self.features)

    def forward(self, z: torch.Tensor, z_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(torch.cat([z, z_other], 1))
        return self.head(feats).flatten(), feats


def _init_normal(module: nn.Module, std: float = 0.01) -> None:
    """The code's initialisation: weights N(0, 0.01), biases 0, BatchNorm scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _spectral_normalise(*modules: nn.Module) -> None:
    """Spectral normalisation (Miyato et al. 2018) on every conv and linear layer inside `modules`."""
    for module in modules:
        for m in list(module.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                spectral_norm(m)


def spectral_normalised(module: nn.Module) -> list[str]:
    """Names of the layers of `module` that carry a spectral-norm parametrization."""
    return [
        name
        for name, m in module.named_modules()
        if hasattr(m, "parametrizations") and any("SpectralNorm" in type(p).__name__ for p in m.parametrizations.weight)
    ]


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def real_fake_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE(real → 1) + BCE(fake → 0), each averaged over the batch. A discriminator minimises it
    as written; the encoder and generator minimise it with the arguments swapped."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return real + fake


def feature_matching_score(feats_real: torch.Tensor, feats_rec: torch.Tensor) -> torch.Tensor:
    """‖f(x, x) − f(x, G(E(x)))‖₁ per image: [N]."""
    return (feats_real - feats_rec).abs().flatten(1).sum(1)


class FeatureMatchingScorer(nn.Module):
    """Scoring as one forward pass: x -> (G(E(x)), feature-matching score). What the detector
    scores with, and what `scanomaly export` writes to ONNX."""

    def __init__(self, encoder: Encoder, generator: Generator, d_xx: ImageCycleDiscriminator):
        super().__init__()
        self.encoder, self.generator, self.d_xx = encoder, generator, d_xx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_rec = self.generator(self.encoder(x))
        _, f_real = self.d_xx(x, x)
        _, f_rec = self.d_xx(x, x_rec)
        # float: under bf16 autocast the score is still computed in float32
        return x_rec.float(), feature_matching_score(f_real.float(), f_rec.float())



# ---------------------------------------------------------------------------------------------
# training task: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class ALADTask(GANTask):
    # the code scores with moving averages of E, G and D_xx
    ema_modules = ("encoder", "generator", "d_xx")

    def __init__(self, encoder, generator, d_xz, d_xx, d_zz, cfg: "ALADConfig"):
        self.encoder, self.generator, self.d_xz, self.d_xx, self.d_zz, self.cfg = encoder, generator, d_xz, d_xx, d_zz, cfg
        betas = tuple(cfg.betas)
        # one Adam per side: each discriminator's loss touches only its own weights, and E's and
        # G's losses differ only by terms that do not depend on the other's weights, so one
        # optimizer over the summed loss takes exactly the code's five separate Adam steps
        self._optimizers = {
            "discriminators": torch.optim.Adam(
                [*d_xz.parameters(), *d_xx.parameters(), *d_zz.parameters()], lr=cfg.lr, betas=betas
            ),
            "generator": torch.optim.Adam([*encoder.parameters(), *generator.parameters()], lr=cfg.lr, betas=betas),
        }

    def modules(self):
        return {"encoder": self.encoder, "generator": self.generator, "d_xz": self.d_xz, "d_xx": self.d_xx, "d_zz": self.d_zz}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [
            Phase("discriminators", optimizer="discriminators", modules=("d_xz", "d_xx", "d_zz")),
            Phase("generator", optimizer="generator", modules=("encoder", "generator")),
        ]

    def _logits(self, x: torch.Tensor, with_grad: bool) -> dict[str, torch.Tensor]:
        z = per_sample_randn(len(x), self.cfg.latent, device=x.device)
        with torch.set_grad_enabled(with_grad):
            z_enc, x_gen = self.encoder(x), self.generator(z)
            x_rec, z_rec = self.generator(z_enc), self.encoder(x_gen)
        return {
            "xz_enc": self.d_xz(x, z_enc)[0],  # (x, E(x)): "real"
            "xz_gen": self.d_xz(x_gen, z)[0],  # (G(z), z): "fake"
            "xx_real": self.d_xx(x, x)[0],
            "xx_fake": self.d_xx(x, x_rec)[0],
            "zz_real": self.d_zz(z, z)[0],
            "zz_fake": self.d_zz(z, z_rec)[0],
        }

    def loss(self, phase, batch):
        x = batch["x"]
        if phase == "discriminators":
            lg = self._logits(x, with_grad=False)
            xz = real_fake_loss(lg["xz_enc"], lg["xz_gen"])
            xx = real_fake_loss(lg["xx_real"], lg["xx_fake"])
            zz = real_fake_loss(lg["zz_real"], lg["zz_fake"])
            return xz + xx + zz, {"D/xz": xz.item(), "D/xx": xx.item(), "D/zz": zz.item()}

        lg = self._logits(x, with_grad=True)
        xz = real_fake_loss(lg["xz_gen"], lg["xz_enc"])  # swapped: G wants (G(z), z) real, E wants (x, E(x)) fake
        cycle_x = real_fake_loss(lg["xx_fake"], lg["xx_real"])
        cycle_z = real_fake_loss(lg["zz_fake"], lg["zz_real"])
        return xz + cycle_x + cycle_z, {"G/xz": xz.item(), "G/cycle_x": cycle_x.item(), "G/cycle_z": cycle_z.item()}

    def sample_rows(self, batch, nets):
        x = batch["x"]
        x_rec = nets["generator"](nets["encoder"](x))
        z = torch.randn(len(x), self.cfg.latent, device=x.device, generator=torch.Generator(x.device).manual_seed(0))
        return [("input", x), ("G(E(x))", x_rec), ("difference", anomaly_map(x, x_rec)[:, None]), ("G(z)", nets["generator"](z))]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class ALADConfig(LoopConfig):
    latent: int = 100
    width: int = 128  # E, G and D_xz's image path: 128-256-512 at 32 px
    max_width: int = 512
    dxx_width: int = 64  # D_xx: 64-128 at 32 px
    dzz_width: int = 64  # D_zz: 64-32
    joint_width: int = 1024  # D_xz's joint layer; its latent path is half as wide
    dropout: float = 0.2
    # 100 epochs of the code's CIFAR-10 normal training class (3,600 images) at batch 32; the code
    # takes the epoch count from the command line and stops early, so 100 is our ceiling
    iterations: int = 11_250
    batch_size: int = 32
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    lr_decay_fraction: float = 0.0  # the code keeps the learning rate constant
    hflip: bool = False  # the paper does not augment; a flipped chest X-ray is not a healthy one
    checkpoint_every: int = 1000
    sample_every: int = 1000
    # ema_decay keeps LoopConfig's 0.999: the code scores with EMA weights too


@register
class ALAD(GANDetector):
    name = "alad"
    scoring_networks = ("encoder", "generator", "d_xx")  # E and G reconstruct, D_xx's features score
    Config = ALADConfig
    profiles = {
        # the official CIFAR-10 setting: 32 px, 3 channels
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 32, "channels": 3},
        },
        # ~30 minutes on 2 CPU cores: E, G and D_xz at a quarter of the paper's width, 64 px, the
        # paper's batch; measured 0.9 it/s on one (shared) core, so ~1.5 it/s on two: 2500
        # iterations ≈ 27 minutes
        "cpu": {
            "config": {
                "width": 32,
                "max_width": 256,
                "dxx_width": 32,
                "joint_width": 256,
                "iterations": 2500,
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
                "dxx_width": 8,
                "dzz_width": 16,
                "joint_width": 32,
                "iterations": 20,
                "batch_size": 4,
                "ema_decay": 0.9,
                "checkpoint_every": 10,
                "sample_every": 10,
            },
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        try:
            num_halvings(p.image_size, final_size=8)
        except ValueError:
            raise ScanomalyError(f"alad: image_size must be 8 times a power of two (16, 32, 64, ...), got {p.image_size}") from None
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        ch, s = p.channels, p.image_size
        self.encoder = Encoder(ch, s, c.latent, c.width, c.max_width).to(self.device)
        self.generator = Generator(ch, s, c.latent, c.width, c.max_width).to(self.device)
        self.d_xz = JointDiscriminator(ch, s, c.latent, c.width, c.max_width, c.joint_width, c.dropout).to(self.device)
        self.d_xx = ImageCycleDiscriminator(ch, s, c.dxx_width, c.dropout).to(self.device)
        self.d_zz = LatentCycleDiscriminator(c.latent, c.dzz_width, c.dropout).to(self.device)
        # the networks that score: replaced by their EMA copies after fit

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True):
        """Train on healthy images only (`unlabeled` is not used by this one-class method)."""
        x = self._healthy_tensor(healthy)
        task = ALADTask(self.encoder, self.generator, self.d_xz, self.d_xx, self.d_zz, self.config)
        self.train_result = self._train(task, {"x": x}, work_dir, progress, sample_batch={"x": x[:8]})
        return self

    # -- score -------------------------------------------------------------------------------
    def scoring_network(self) -> FeatureMatchingScorer:
        return FeatureMatchingScorer(self.scoring["encoder"], self.scoring["generator"], self.scoring["d_xx"])

    # persistence (GANDetector): E, G and D_xx are saved; D_xz and D_zz are only needed to train
