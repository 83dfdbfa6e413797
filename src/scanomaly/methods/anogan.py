"""AnoGAN (Schlegl et al., IPMI 2017): learn the manifold of healthy images with a GAN; an image is
anomalous when no point of that manifold looks like it.

    training:   a DCGAN on healthy images, z ~ U[−1, 1]^100, the standard non-saturating loss
                    D:  −log D(x) − log(1 − D(G(z)))
                    G:  −log D(G(z))
    mapping:    G and D frozen; for a new image x, start from a random z and minimise, over z only,
                    L(z) = (1−λ)·Σ|x − G(z)| + λ·Σ|f(x) − f(G(z))|          λ = 0.1
                by gradient descent for Γ steps (Γ = 500); f is an intermediate feature layer of D
                (here the last 4 x 4 feature map, the input of D's final layer).
    score:      L(z_Γ), the same combination at the final z;  heatmap |x − G(z_Γ)|

The mapping is the expensive part (Γ forward and backward passes through G and D per image), so it
is batched: a whole batch of images, times `search_restarts` starting points, is one tensor of
independent z's. Each image's loss is its own and the losses are summed, so the gradient of z_i
depends only on image i; G and D are in eval mode, so BatchNorm uses its running statistics and the
images do not interact; and Adam is applied per element, so every z_i follows the same path as it
would alone (tests/test_anogan.py checks this). Per image, the best of the restarts is kept, and an
image whose loss has stopped improving (relative gain below `search_tol` over `search_patience`
steps) stops early while the others go on.

What differs from the paper, and why:
- The starting points are drawn from a torch.Generator seeded by `seed`, once per call, and shared
  by every image: scores are reproducible, and an image's score does not depend on which other
  images are scored with it or in what order.
- z is kept in the prior's support [−1, 1] after each step (`project_z`): G never saw other z's, and
  outside the support it can draw things that are not healthy anatomy. The paper does not say.
- The score is L at the best z visited (per image, over steps and restarts), which with a
  decreasing loss is the final z; with Adam the last step may overshoot slightly.
- The step rule is Adam (`search_lr`), as in the public implementations; the paper says only
  "backpropagation".
- Networks: the repository's DCGAN stacks (nn/blocks.py), depth following the image size, width
  configurable; the original's exact layer sizes were not published.
- The cpu profile trains a half-width DCGAN for 4000 iterations with a learning rate that decays
  over the last quarter and horizontal flips, and searches Γ = 200 steps with early stop (see
  the profile's note); the paper profile keeps Γ = 500 and no early stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..detector import register
from ..distributed import per_sample_rand
from ..errors import ScanomalyError
from ..nn.blocks import dcgan_decoder, dcgan_encoder, dcgan_init
from ..training.loop import GANTask, LoopConfig, Phase
from ._gan import GANDetector

# Memory format of the networks and their inputs, as f-AnoGAN's (see there: faster scoring on the CPU in a shared-machine
# measurement; not measured for these DCGAN networks, and HealthyGAN's trained 5.8x slower in it, BENCHMARKS.md)
CHANNELS_LAST = torch.channels_last


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """DCGAN generator: z [N, latent_dim] -> image [N, C, S, S] in [−1, 1]."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 64, width: int = 64, max_width: int = 512):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = dcgan_decoder(latent_dim, channels, image_size, width, max_width)
        dcgan_init(self)
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN discriminator: image -> logit [N, 1]; `features(x)` is f, the input of the last layer."""

    def __init__(self, channels: int = 1, image_size: int = 64, width: int = 64, max_width: int = 512):
        super().__init__()
        body = dcgan_encoder(channels, 1, image_size, width, max_width, norm="batch", final_bias=True)
        self.features_net, self.output = body[:-1], body[-1]
        dcgan_init(self)
        self.to(memory_format=CHANNELS_LAST)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the last feature map (8·width x 4 x 4 at 64 px), flattened to [N, F]."""
        return self.features_net(x.contiguous(memory_format=CHANNELS_LAST)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features_net(x.contiguous(memory_format=CHANNELS_LAST))
        return self.output(h).flatten(1)


def sample_latent(n: int, dim: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ U[−1, 1]^dim, the paper's prior (a seeded generator for fixed samples; else drawn so that
    distributed ranks draw what one process would, see `scanomaly.distributed`)."""
    if generator is not None:
        return torch.rand(n, dim, generator=generator, device=device) * 2 - 1
    return per_sample_rand(n, dim, device=device) * 2 - 1


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log D(x) − log(1 − D(G(z))), with D = sigmoid(logit): softplus(−real) + softplus(fake)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss −log D(G(z)) = softplus(−logit)."""
    return F.softplus(-fake_logits).mean()


def residual_loss(x: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Σ|x − G(z)| per image: [N]."""
    return (x - generated).abs().flatten(1).sum(1)


def discrimination_loss(features_x: torch.Tensor, features_generated: torch.Tensor) -> torch.Tensor:
    """Σ|f(x) − f(G(z))| per image: [N] (the paper's feature-matching variant)."""
    return (features_x - features_generated).abs().flatten(1).sum(1)


def mapping_loss(x, generated, features_x, features_generated, lam: float) -> torch.Tensor:
    """L(z) = (1−λ)·residual + λ·discrimination, per image: [N]. Also the anomaly score."""
    return (1 - lam) * residual_loss(x, generated) + lam * discrimination_loss(features_x, features_generated)



# ---------------------------------------------------------------------------------------------
# the mapping: batched latent search
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    z: torch.Tensor  # [N, latent_dim], the best z of each image
    loss: torch.Tensor  # [N], L at that z: the anomaly score
    generated: torch.Tensor  # [N, C, S, S], G(z)
    steps: torch.Tensor  # [N] (long), Adam steps taken by the restart that won (< Γ when it stopped early)


def latent_search(
    generator: Generator,
    discriminator: Discriminator,
    x: torch.Tensor,
    *,
    steps: int = 500,
    lam: float = 0.1,
    lr: float = 0.1,
    restarts: int = 1,
    tol: float = 0.0,
    patience: int = 10,
    seed: int = 0,
    project: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> SearchResult:
    """Find, for every image of x independently, the z whose G(z) is closest to it (AnoGAN's mapping).

    All N x `restarts` searches run as one batch; row r·N + i is restart r of image i, started at
    the r-th of `restarts` points drawn from U[−1, 1] by a generator seeded with `seed`. Adam is
    written out per row so that a row that has stopped (early stop) is left exactly where it is.
    Early stop: every `patience` steps, a row whose best loss improved by less than `tol` (relative)
    since the last check stops; `tol = 0` runs all `steps` steps.
    G and D must be in eval mode (BatchNorm on running statistics), else images would interact.
    """
    if generator.training or discriminator.training:
        raise ScanomalyError("latent_search needs G and D in eval mode (else BatchNorm mixes the images of a batch)")
    if steps < 0 or restarts < 1:
        raise ScanomalyError(f"latent search needs steps >= 0 and restarts >= 1, got {steps} and {restarts}")
    device, n, dim = x.device, len(x), generator.latent_dim
    starts = sample_latent(restarts, dim, generator=torch.Generator().manual_seed(seed)).to(device)
    z = starts.repeat_interleave(n, dim=0)  # row r·N + i
    x_rows = x.repeat(restarts, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        fx_rows = discriminator.features(x).repeat(restarts, 1)

    rows = len(z)
    m, v = torch.zeros_like(z), torch.zeros_like(z)  # Adam's moments, per row
    best_loss = torch.full((rows,), float("inf"), device=device)
    best_z = z.clone()
    ref_loss = torch.full((rows,), float("inf"), device=device)  # best loss at the last early-stop check
    taken = torch.zeros(rows, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)
    b1, b2 = betas
    for t in range(steps + 1):
        last = t == steps  # the last z is evaluated, not moved
        zs = z[active].requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            gen = generator(zs)
            loss = mapping_loss(x_rows[active], gen, fx_rows[active], discriminator.features(gen), lam)
        better = loss.detach() < best_loss[active]
        best_loss[active] = torch.where(better, loss.detach(), best_loss[active])
        best_z[active] = torch.where(better[:, None], zs.detach(), best_z[active])
        if last:
            break
        # the sum keeps each row's gradient its own: d(Σ_j L_j)/dz_i = dL_i/dz_i
        (grad,) = torch.autograd.grad(loss.sum(), zs)
        # Adam, row-wise (all active rows share the step count t + 1)
        m[active] = b1 * m[active] + (1 - b1) * grad
        v[active] = b2 * v[active] + (1 - b2) * grad * grad
        m_hat, v_hat = m[active] / (1 - b1 ** (t + 1)), v[active] / (1 - b2 ** (t + 1))
        z_new = z[active] - lr * m_hat / (v_hat.sqrt() + eps)
        z[active] = z_new.clamp(-1.0, 1.0) if project else z_new
        taken[active] += 1
        if tol > 0 and (t + 1) % patience == 0:
            gained = ref_loss[active] - best_loss[active]
            stalled = gained <= tol * best_loss[active].abs()
            ref_loss[active] = best_loss[active]
            active = active[~stalled]
            if len(active) == 0:
                break

    # the best restart of each image
    pick = best_loss.view(restarts, n).argmin(0)
    idx = pick * n + torch.arange(n, device=device)
    z_best = best_z[idx]
    with torch.no_grad():  # recompute at the chosen z, so that score and heatmap come from the same G(z)
        gen = generator(z_best)
        final = mapping_loss(x, gen, fx_rows[:n], discriminator.features(gen), lam)
    return SearchResult(z=z_best, loss=final, generated=gen, steps=taken[idx])


# ---------------------------------------------------------------------------------------------
# training task: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class AnoGANTask(GANTask):
    """DCGAN: one discriminator step and one generator step per iteration."""

    def __init__(self, generator: Generator, discriminator: Discriminator, cfg: "AnoGANConfig"):
        self.generator, self.discriminator, self.cfg = generator, discriminator, cfg
        betas = tuple(float(b) for b in cfg.betas)
        self._optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=betas),
            "discriminator": torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=betas),
        }
        # a fixed z for the sample grids, so that grids of successive checkpoints are comparable
        self.fixed_z = sample_latent(8, generator.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))

    def modules(self):
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [
            Phase("discriminator", optimizer="discriminator", modules=("discriminator",)),
            Phase("generator", optimizer="generator", modules=("generator",)),
        ]

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        return sample_latent(len(x), self.generator.latent_dim, device=x.device)

    def loss(self, phase, batch):
        x = batch["x"]
        if phase == "discriminator":
            with torch.no_grad():
                fake = self.generator(self._z(x))
            real_logits, fake_logits = self.discriminator(x), self.discriminator(fake)
            loss = discriminator_loss(real_logits, fake_logits)
            logs = {"D/loss": loss, "D/real": torch.sigmoid(real_logits).mean(), "D/fake": torch.sigmoid(fake_logits).mean()}
            return loss, {k: v.item() for k, v in logs.items()}
        loss = generator_loss(self.discriminator(self.generator(self._z(x))))
        return loss, {"G/loss": loss.item()}

    def sample_rows(self, batch, nets):
        return [("real", batch["x"][:8]), ("generated", nets["generator"](self.fixed_z.to(batch["x"].device)))]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class AnoGANConfig(LoopConfig):
    latent_dim: int = 100
    width: int = 64  # G's last / D's first width; doubles per layer up to max_width
    max_width: int = 512
    iterations: int = 100_000
    batch_size: int = 64
    lr: float = 2e-4  # DCGAN's Adam settings
    betas: tuple = (0.5, 0.999)
    lr_decay_fraction: float = 0.0  # the paper: constant learning rate
    ema_decay: float = 0.0  # no EMA: the trained networks score
    hflip: bool = False
    checkpoint_every: int = 5000
    sample_every: int = 5000
    # the mapping (scoring)
    search_steps: int = 500  # Γ
    search_lambda: float = 0.1  # λ
    search_lr: float = 0.1  # Adam's step size on z (see the cpu profile's note)
    search_restarts: int = 1
    search_tol: float = 0.0  # early stop: relative gain per `search_patience` steps; 0 = always Γ steps
    search_patience: int = 10
    project_z: bool = True  # keep z in [−1, 1]
    # `seed` (LoopConfig) seeds training and the starting points of the search


@register
class AnoGAN(GANDetector):
    name = "anogan"
    scoring_networks = ("generator", "discriminator")  # G draws, D's features f score
    not_exportable_because = (
        "its score searches the latent space for each image (Γ steps of gradient descent on z), which is "
        "not one forward pass; f-AnoGAN (fanogan) replaces the search with an encoder and exports"
    )
    Config = AnoGANConfig
    profiles = {
        # the paper: 64 x 64 grayscale, DCGAN width 64, Γ = 500, λ = 0.1 (GPU); 100k iterations is
        # our choice (the paper gives no count)
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # ~25 minutes of training on 2 CPU cores at 64 px (measured 0.58 CPU-s per iteration at
        # width 32, batch 64, on one core: ~2.9 it/s on two), and ~0.3 s per scored image: Γ = 200
        # with early stop (1e-3 per 20 steps) averaged ~165 Adam steps at ~3.4 CPU-ms per
        # image-step. On healthy training images (no labels), Adam with step 0.1 reached at Γ = 200
        # a lower loss than step 0.01 at Γ = 500, and came within 0.4% of its own Γ = 500 loss.
        "cpu": {
            "config": {
                "width": 32,
                "max_width": 256,
                "iterations": 4000,
                "lr_decay_fraction": 0.25,
                "hflip": True,
                "checkpoint_every": 500,
                "sample_every": 1000,
                "search_steps": 200,
                "search_tol": 1e-3,
                "search_patience": 20,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests and smoke runs
        "tiny": {
            "config": {
                "latent_dim": 16,
                "width": 8,
                "max_width": 32,
                "iterations": 20,
                "batch_size": 8,
                "checkpoint_every": 10,
                "sample_every": 10,
                "search_steps": 10,
            },
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        if not 0.0 <= c.search_lambda <= 1.0:
            raise ScanomalyError(f"search_lambda must be in [0, 1], got {c.search_lambda}")
        if c.search_restarts < 1 or c.search_steps < 0 or c.search_patience < 1:
            raise ScanomalyError("search_restarts and search_patience must be >= 1 and search_steps >= 0")
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        self.generator = Generator(c.latent_dim, p.channels, p.image_size, c.width, c.max_width).to(self.device)
        self.discriminator = Discriminator(p.channels, p.image_size, c.width, c.max_width).to(self.device)

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True):
        x = self._healthy_tensor(healthy)
        task = AnoGANTask(self.generator, self.discriminator, self.config)
        self.train_result = self._train(task, {"x": x}, work_dir, progress, sample_batch={"x": x[:8]})
        return self

    def _ready_to_score(self) -> None:
        self._eval()

    def _eval(self) -> None:
        # eval: BatchNorm on running statistics, so that the images of a batch do not interact;
        # frozen: the search differentiates with respect to z only
        self.generator.eval().requires_grad_(False)
        self.discriminator.eval().requires_grad_(False)

    # -- score -------------------------------------------------------------------------------
    def search(self, images: torch.Tensor) -> SearchResult:
        """The mapping of one batch of images, with this detector's settings. Always in float32,
        whatever the training precision: Adam on z with half-precision gradients is noisy."""
        c = self.config
        self._eval()
        return latent_search(
            self.generator,
            self.discriminator,
            images.to(self.device),
            steps=c.search_steps,
            lam=c.search_lambda,
            lr=c.search_lr,
            restarts=c.search_restarts,
            tol=c.search_tol,
            patience=c.search_patience,
            seed=c.seed,
            project=c.project_z,
        )

    def _reconstruct_and_score(self, x):
        # the search needs gradients w.r.t. z, so no torch.no_grad here
        r = self.search(x)
        return r.generated, r.loss

    # -- persistence (GANDetector): both networks are needed to score (G to draw, D for f) -------------
    def extra_state(self):
        out = super().extra_state()
        if out:
            out["iterations_per_second"] = self.train_result.iterations_per_second
        return out
