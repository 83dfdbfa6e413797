"""HealthyGAN (Rahman Siddiquee et al., 2022): learn to make any scan look healthy from a mixed,
unlabeled set A and a known-healthy set B; the anomaly is what had to change.

    generator:  x -> (T, M);  healthy(x) = M·T + (1−M)·x        (attention-masked translation)
    critic:     WGAN-GP, real = B, fake = healthy(A)
    losses (generator, every n_critic iterations):
        adversarial   −D(healthy(A)) − D(healthy(B))
        identity      |x_B − T_B|                               (healthy scans need no change)
        reconstruction|x_A − (M_A·x_A + (1−M_A)·T_A)|           (where the mask is off, T must equal x:
                                                                 replaces CycleGAN's cycle consistency)
        mask          (mean M)² + mean 1/(|M−0.5|+0.01) − 1/0.51 (small masks, near 0 or 1)
    score:  mean |x − healthy(x)| / 2;  heatmap |x − healthy(x)|
            (option score="features": the cosine distance between frozen ImageNet features of x and of
            healthy(x), per position over two or three backbone stages, upsampled and blurred as in
            PaDiM / PatchCore; its mean (or max) is the score, the map is the heatmap)
            (option score="critic": the critic's deficit, its mean verdict on B minus its verdict on x,
            patch by patch; with a critic near 1-Lipschitz it is a lower bound on how much x must change
            to pass as healthy; the deficit map, upsampled, is the heatmap; the critic is saved with the model)
    option generator="lite0": a frozen EfficientNet-Lite0 encoder under a light upsample + conv decoder
            (nn/pretrained_translator.py) in place of the StarGAN generator; same heads, blend and losses
    option critic="lite0": the critic's trunk is frozen EfficientNet-Lite0 (stage3 + stage5 at twice the
            image size, as PatchCore's cpu profile sees it) under a small trained head (nn/pretrained_critic.py);
            the same WGAN-GP game, the penalty on the trunk's features
    option heatmap="nearest" (with critic="lite0", score="critic"): the score stays the critic's deficit, the
            heatmap is where the scan's trunk features leave healthy ones: each patch's distance to its nearest
            patch among B's (a coreset kept with the model), upsampled and blurred as PatchCore's map
    option score="critic+nearest" (with critic="lite0"): w · deficit / σ_critic + max(nearest-patch map) / σ_memory,
            each σ the standard deviation of that part over the scans AUCp compares (unseen in training, no labels):
            the trained verdict on the whole scan beside a memory that needs no training; w = clip(2 (1 − m), 0, 1)
            lowers the critic's say as it memorises B (m: AUROC of B's training scans against held-out healthy ones)
    option mask_target (with critic="lite0"): one more generator term, mask_target · BCE(M_A, t_A), t_A the
            probability that a pixel of A is not healthy by that memory (MaskTarget): the mask is told where to change,
            and the translation T then has somewhere to act (the paper's losses alone let the mask empty out or fill
            the image at this scale: docs/experiments.md, sections 10, 17-19)
    option heatmap="mask": the heatmap is the generator's attention mask M itself, where it changes the scan
            (with the mask's target it ranks lesion pixels above the memory it is taught from: section 20)
    option padding="reflect": every convolution of the generator (lite0: of its decoder) pads by reflection, as CycleGAN's generator
            does, instead of with zeros, which tell the pixels near the edge where they are: the untrained mask then
            starts apart there, and the zero-one term can keep a band no scan asked for (section 26)

What differs from the official code, and why (measured in BENCHMARKS.md): the learning rate really
decays linearly to 0 over the last quarter (the official decrement is ~1e-9 per step, i.e. none);
scoring uses an exponential moving average of the generator's weights; the critic's depth and
width follow the image size; and the scoring checkpoint can be chosen label-free by AUCp (the
authors' pseudo-AUC of held-out healthy scans against the unlabeled pool). The cpu profile goes further,
each step chosen by a rule written before its runs (the profile's comment; docs/experiments.md): nearest
upsampling and reflection padding in the generator, identity weight 5 and mask weight 1, a critic on frozen
EfficientNet-Lite0 features, the mask taught by the memory of healthy patches on that trunk, the critic's deficit
plus that memory's maximum as the score, and the mask as the heatmap.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from ..detector import anomaly_map, as_tensor, register
from ..errors import ScanomalyError
from ..nn.blocks import ResidualBlock, gradient_penalty, num_halvings
from ..nn.pretrained_critic import CRITIC_STAGES, PretrainedPatchCritic
from ..nn.pretrained_translator import ENCODER_STAGES, PretrainedMaskedTranslator
from ..training.loop import GANTask, LoopConfig, Phase
from . import _patch_features as pf
from ._gan import GANDetector
from .patchcore import greedy_coreset


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
UPSAMPLING = ("transposed", "nearest")
PADDINGS = ("zeros", "reflect")


class MaskedTranslator(nn.Module):
    """StarGAN-style generator without biases: 7x7 stem, two stride-2 downs, residual blocks,
    two ups, 7x7 head to C+1 channels: C for the translation T, 1 for the mask M. The ups are the
    original's 4x4 stride-2 transposed convolutions, or (upsample="nearest") a nearest-neighbour x2
    then a 3x3 convolution: transposed convolutions make even and odd columns with different taps,
    and the mask loss's zero-one term turns that parity into 0/1 stripes (docs/experiments.md).
    padding="reflect" pads every convolution by reflection (CycleGAN's generator does at its stem, residual
    blocks and head) instead of the original's zeros: zeros tell the pixels near the edge where they are, and
    the mask loss's zero-one term can keep a band there that no scan asked for (docs/experiments.md, section 26)."""

    def __init__(self, channels: int = 1, width: int = 64, residual_blocks: int = 6, upsample: str = "transposed",
                 padding: str = "zeros"):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ScanomalyError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
        w = width
        layers: list[nn.Module] = [
            nn.Conv2d(channels, w, 7, 1, 3, bias=False, padding_mode=padding),
            nn.InstanceNorm2d(w, affine=True),
            nn.ReLU(inplace=True),
        ]
        for _ in range(2):
            layers += [nn.Conv2d(w, w * 2, 4, 2, 1, bias=False, padding_mode=padding), nn.InstanceNorm2d(w * 2, affine=True), nn.ReLU(inplace=True)]
            w *= 2
        layers += [ResidualBlock(w, padding_mode=padding) for _ in range(residual_blocks)]
        for _ in range(2):
            if upsample == "transposed":  # the original's
                up = [nn.ConvTranspose2d(w, w // 2, 4, 2, 1, bias=False)]  # its output is cropped, not padded
            else:  # even and odd output pixels made by the same taps: no parity pattern for the mask to binarise
                up = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w // 2, 3, 1, 1, bias=False, padding_mode=padding)]
            layers += [*up, nn.InstanceNorm2d(w // 2, affine=True), nn.ReLU(inplace=True)]
            w //= 2
        layers.append(nn.Conv2d(w, channels + 1, 7, 1, 3, bias=False, padding_mode=padding))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (healthy, T, M)."""
        out = self.net(x)
        translation = torch.tanh(out[:, :-1])
        # about 0.5 at initialisation, to one side or the other by seed; the mask loss's zero-one term then drives each pixel
        # to the side it starts on (the paper's losses alone: seed 2 starts above 0.5 and ends with M = 1, docs/experiments.md,
        # section 17; with zero padding the rows it reaches can start above it and keep a warm band: sections 24 and 26)
        mask = (torch.tanh(out[:, -1:]) + 1) / 2
        healthy = mask * translation + (1 - mask) * x
        return healthy, translation, mask


class PatchCritic(nn.Module):
    """WGAN critic: stride-2 conv4x4 + LeakyReLU(0.01), widths doubling from `width` up to
    `max_width`, until the map is `final_size` wide; then conv3x3 -> 1 (a patch map). No norm
    (the gradient penalty is per sample). At 256 px with 64..2048 this is the original's six layers."""

    def __init__(self, channels: int, image_size: int, width: int = 64, max_width: int = 2048, final_size: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        ch_in, ch = channels, width
        for _ in range(num_halvings(image_size, final_size)):
            layers += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.01, inplace=True)]
            ch_in, ch = ch, min(ch * 2, max_width)
        layers.append(nn.Conv2d(ch_in, 1, 3, 1, 1, bias=False))
        self.net = nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the trained part judges: the pixels themselves (the pretrained critic's are its trunk's features)."""
        return x

    def judge(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def mask_loss(mask: torch.Tensor) -> torch.Tensor:
    """(mean M)² keeps masks small; mean 1/(|M−0.5|+0.01) − 1/0.51 (0 when M ∈ {0, 1}) keeps them binary."""
    return mask.mean() ** 2 + (1.0 / ((mask - 0.5).abs() + 0.01)).mean() - 1.0 / 0.51


def identity_loss(x_b: torch.Tensor, translation_b: torch.Tensor) -> torch.Tensor:
    """Healthy scans need no change: on B, the raw translation T (not the blend) must equal x."""
    return (x_b - translation_b).abs().mean()


def reconstruction_loss(x_a: torch.Tensor, translation_a: torch.Tensor, mask_a: torch.Tensor) -> torch.Tensor:
    """Where the mask is off, the translation must equal the input: |x − (M·x + (1−M)·T)|."""
    return (x_a - (mask_a * x_a + (1 - mask_a) * translation_a)).abs().mean()


def mask_target_loss(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the mask against a probability target, in float32 (autocast-safe): its optimum is the
    target's conditional mean. (An L1 pull to a sparse 0/1 target is optimal at its median, 0: the masks emptied.)"""
    m = mask.float().clamp(1e-4, 1 - 1e-4)
    return -(target * m.log() + (1 - target) * (1 - m).log()).mean()


def paper_score(x: torch.Tensor, healthy: torch.Tensor) -> torch.Tensor:
    """The paper's anomaly score: mean over pixels of |x − healthy(x)| / 2."""
    return anomaly_map(x, healthy).flatten(1).mean(1) / 2


class CriticDeficit(nn.Module):
    """The critic's verdict as "what had to change": how far below healthy scans' verdict a scan falls,
    patch by patch. The critic is trained towards 1-Lipschitz (the gradient penalty), so a scan whose
    mean verdict is Δ below B's must change by about Δ or more (L2, in pixels) to pass as healthy.
    `reference` is the mean patch map of the training set B: positions where healthy scans always get
    a low verdict (the image border) are not anomalies. x -> (score = mean deficit, heatmap = the
    deficit map bilinearly upsampled to the image)."""

    def __init__(self, critic: PatchCritic, reference: torch.Tensor):
        super().__init__()
        self.critic = critic
        self.register_buffer("reference", reference)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deficit = self.reference - self.critic(x)
        heatmap = nn.functional.interpolate(deficit, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return deficit.flatten(1).mean(1), heatmap[:, 0]


class NearestHealthyPatch(nn.Module):
    """Where a scan's features leave healthy ones: for each patch of the pretrained critic's frozen trunk
    features, the Euclidean distance to its nearest patch in `bank` (a coreset of B's patches), upsampled
    and blurred (sigma in image pixels) as PatchCore's map. The trunk is the critic's own: no second
    backbone. x [N, C, S, S] -> heatmap [N, S, S]. The bank is searched in fixed slices, so the memory
    stays bounded and the loop over them traces to ONNX. (Patches averaged over 3 x 3 neighbourhoods, as
    PatchCore's, lost on lgg_flair's lesion masks: docs/experiments.md, section 14.)"""

    def __init__(self, critic: "PretrainedPatchCritic", bank: torch.Tensor, sigma: float = 4.0):
        super().__init__()
        self.critic, self.sigma = critic, sigma
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.critic.features(x)
        n, c, h, w = f.shape
        with torch.autocast(device_type=x.device.type, enabled=False):  # distances in float32, never bf16
            q = f.float().permute(0, 2, 3, 1).reshape(-1, c)
            q_sq = (q * q).sum(1, keepdim=True)
            d2 = None
            for s in range(0, len(self.bank), NEAREST_SLICE):
                part = torch.addmm(q_sq + self.bank_sq[None, s:s + NEAREST_SLICE], q, self.bank[s:s + NEAREST_SLICE].t(),
                                   alpha=-2.0).amin(1)
                d2 = part if d2 is None else torch.minimum(d2, part)
            distance = d2.clamp_min(0).sqrt().view(n, h, w)
            return pf.to_anomaly_map(distance, x.shape[-1], self.sigma)


NEAREST_SLICE = 4096  # bank rows per distance block: 64 scans x 256 patches x 4096 x 4 B = 256 MiB


class MaskTarget(nn.Module):
    """What the mask is taught (option mask_target): the probability that a pixel is not healthy by the memory,
    sigmoid((d − d99) / s), d the nearest-patch map, d99 and d90 its 99th and 90th percentiles over held-out healthy
    scans' pixels, s = (d99 − d90) / ln 9: 0.1 at d90, 0.5 at d99, dense and smooth. x -> [N, 1, S, S]."""

    def __init__(self, nearest: NearestHealthyPatch, healthy_holdout: torch.Tensor, batch_size: int = 64):
        super().__init__()
        self.nearest = nearest
        with torch.no_grad():
            device = nearest.bank.device
            d = torch.cat([nearest(healthy_holdout[i : i + batch_size].to(device)).cpu()
                           for i in range(0, len(healthy_holdout), batch_size)])
        self.d99, d90 = (float(np.quantile(d.numpy(), q)) for q in (0.99, 0.90))
        self.scale = max(self.d99 - d90, 1e-6) / math.log(9)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.nearest(x)[:, None] - self.d99) / self.scale)


class HealthyScorer(nn.Module):
    """Scoring as one forward pass: x -> (healthy(x), paper score), or with a feature distance or the
    critic's deficit x -> (healthy(x), score, heatmap), the heatmap then optionally the nearest healthy
    patch's distance. What the detector scores with (and AUCp during training), and what
    `scanomaly export` writes to ONNX (backbone, critic and patch bank included)."""

    def __init__(self, generator: MaskedTranslator, feature_distance: pf.FeatureDistance | None = None,
                 critic_deficit: CriticDeficit | None = None, nearest: NearestHealthyPatch | None = None,
                 fused_scales: torch.Tensor | None = None, heatmap: str = "score"):
        super().__init__()
        self.generator = generator
        self.feature_distance = feature_distance
        self.critic_deficit = critic_deficit
        self.nearest = nearest
        self.fused_scales = fused_scales  # score="critic+nearest": (σ_critic / w, σ_memory)
        self.heatmap = heatmap  # "score": the score's own map; "nearest": the memory's; "mask": the generator's M

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        healthy, _, mask = self.generator(x)
        healthy, heatmap = healthy.float(), None  # float: under bf16 autocast the score is still float32
        if self.critic_deficit is not None:
            scores, heatmap = self.critic_deficit(x)
            if self.nearest is not None:
                memory = self.nearest(x)
                if self.fused_scales is not None:
                    scores = scores / self.fused_scales[0] + memory.flatten(1).amax(1) / self.fused_scales[1]
                if self.heatmap == "nearest":
                    heatmap = memory
        elif self.feature_distance is not None:
            scores, heatmap = self.feature_distance(x, healthy)
        else:
            scores = paper_score(x, healthy)
        if self.heatmap == "mask":
            heatmap = mask[:, 0]
        if heatmap is None:  # the paper's: the detector draws |x − healthy(x)|
            return healthy, scores
        return healthy, scores.float(), heatmap.float()


# ---------------------------------------------------------------------------------------------
# training task: what the generic GAN loop runs
# ---------------------------------------------------------------------------------------------
class HealthyGANTask(GANTask):
    ema_modules = ("generator",)

    def __init__(self, generator: MaskedTranslator, critic: PatchCritic, cfg: "HealthyGANConfig",
                 mask_target: MaskTarget | None = None):
        self.generator, self.critic, self.cfg, self.mask_target = generator, critic, cfg, mask_target
        self._optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
            "critic": torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)),
        }

    def modules(self):
        return {"generator": self.generator, "critic": self.critic}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [
            Phase("critic", optimizer="critic", modules=("critic",), every=1),
            Phase("generator", optimizer="generator", modules=("generator",), every=self.cfg.n_critic),
        ]

    def loss(self, phase, batch):
        x_a, x_b, cfg = batch["a"], batch["b"], self.cfg
        if phase == "critic":
            with torch.no_grad():
                fake = self.generator(x_a)[0]
                # the gradient penalty holds the critic's trained part to 1-Lipschitz on what it judges: pixels for
                # the paper's critic, the frozen trunk's features for the pretrained one
                real, fake = self.critic.features(x_b), self.critic.features(fake)
            d_real, d_fake = self.critic.judge(real).mean(), self.critic.judge(fake).mean()
            gp = gradient_penalty(self.critic.judge, real, fake)
            loss = -d_real + d_fake + cfg.lambda_gp * gp
            return loss, {"D/wasserstein": (d_real - d_fake).item(), "D/gp": gp.item()}

        healthy_a, t_a, m_a = self.generator(x_a)
        healthy_b, t_b, m_b = self.generator(x_b)
        adv = -self.critic(healthy_a).mean() - self.critic(healthy_b).mean()
        idt = identity_loss(x_b, t_b)
        rec = reconstruction_loss(x_a, t_a, m_a)
        msk = (mask_loss(m_a) + mask_loss(m_b)) / 2
        loss = adv + cfg.lambda_id * idt + cfg.lambda_rec * rec + cfg.lambda_mask * msk
        logs = {"G/adv": adv, "G/id": idt, "G/rec": rec, "G/mask": msk, "G/mask_mean": m_a.mean()}
        if self.mask_target is not None:  # where A leaves healthy scans, by the memory: the mask is told where to change
            tgt = mask_target_loss(m_a, self.mask_target(x_a))
            loss = loss + cfg.mask_target * tgt
            logs["G/mask_target"] = tgt
        return loss, {k: v.item() for k, v in logs.items()}

    def sample_rows(self, batch, nets):
        x = batch["a"]
        healthy, _, mask = nets["generator"](x)  # the EMA generator: the one that scores
        return [("input", x), ("healthy", healthy), ("mask", mask), ("difference", anomaly_map(x, healthy)[:, None])]


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class HealthyGANConfig(LoopConfig):
    width: int = 64
    residual_blocks: int = 6
    critic_width: int = 64
    critic_max_width: int = 2048
    iterations: int = 400_000
    n_critic: int = 2
    lr: float = 1e-4
    betas: tuple = (0.5, 0.999)
    lambda_gp: float = 10.0
    lambda_id: float = 1.0
    lambda_rec: float = 1.0
    lambda_mask: float = 0.1
    checkpoint_every: int = 10_000
    sample_every: int = 10_000
    selection: str = "aucp"  # "aucp": keep the checkpoint with the best pseudo-AUC; "last": the final one
    holdout_fraction: float = 0.1  # of B (when no holdout set is given) and of A, held out of training for AUCp
    aucp_pool: int = 256  # at most this many held-out unlabeled images are scored for AUCp
    # the anomaly score: "pixel" (the paper's mean |x − healthy(x)|), "features" (FeatureDistance of x
    # and healthy(x) on a frozen backbone: ImageNet weights from the `pretrained` extra), "critic" (the
    # critic's deficit against healthy scans, CriticDeficit: the critic is then saved with the model) or
    # "critic+nearest" (that deficit and the nearest-patch map's maximum, each over its spread on unseen scans, the
    # deficit weighted down as the critic memorises B: `critic_weight`)
    score: str = "pixel"
    score_backbone: str = "efficientnet_lite0"
    score_backbone_weights: str | None = "imagenet"
    score_stages: tuple = ("stage2", "stage3")
    score_input_size: int = 0  # images are enlarged to this size before the backbone (0: as they are)
    score_sigma: float = 4.0  # Gaussian blur of the feature map, in pixels of the image
    score_pool: str = "mean"  # the image score: "mean" or "max" of the feature map
    # the generator: "stargan" (the paper's) or "lite0" (frozen EfficientNet-Lite0 encoder, light
    # upsample + conv decoder: nn/pretrained_translator.py); width and residual_blocks size its decoder
    generator: str = "stargan"
    upsample: str = "transposed"  # the StarGAN generator's ups: "transposed" (the original's) or "nearest"
    padding: str = "zeros"  # the generator's convolutions pad with "zeros" (the original's) or "reflect" (lite0: its decoder's)
    encoder_weights: str | None = "imagenet"
    # the critic: "patch" (the paper's strided convolutions, critic_width..critic_max_width) or "lite0" (a frozen
    # EfficientNet-Lite0 trunk under a head of critic_width channels: nn/pretrained_critic.py)
    critic: str = "patch"
    critic_weights: str | None = "imagenet"
    # the heatmap: "score" (the score's own map), "nearest" (NearestHealthyPatch on the pretrained critic's trunk,
    # beside the critic's score) or "mask" (the generator's attention mask M: where it changes the scan)
    heatmap: str = "score"
    # weight of the mask's target term (0: the paper's losses alone): BCE of M_A against the probability that a pixel of
    # A is not healthy by the nearest-patch memory (MaskTarget)
    mask_target: float = 0.0
    # the rest of the loop's settings (batch_size 16, lr_decay_fraction 0.25, ema_decay 0.999: the EMA generator
    # scores, hflip, seed, keep_snapshots) keep LoopConfig's defaults

    retired_options: ClassVar[dict] = {**LoopConfig.retired_options, "critic_final_size": 4,
                                     # masks that start below 0.5: lost in 2026-11, and again with the mask taught
                                     # (section 24)
                                     "mask_offset": 0.0,
                                     # DiffAugment for the critic: lost two validation rounds (BENCHMARKS.md, A1 and P2)
                                     "critic_augment": "",
                                     # the memory over 3 x 3 patch neighbourhoods: lost its round (section 14)
                                     "nearest_neighbourhood": 1,
                                     # B scans with synthetic lesions in A's batches: lost its round (section 17)
                                     "synthetic_lesions": 0.0}


SCORES = ("pixel", "features", "critic", "critic+nearest")
CRITIC_SCORES = ("critic", "critic+nearest")  # the critic scores, so it is saved with the model
HEATMAPS = ("score", "nearest", "mask")
# share of B's trunk patches kept for the nearest-patch heatmap: PatchCore's cpu coreset fraction
NEAREST_CORESET_FRACTION = 0.1


@register
class HealthyGAN(GANDetector):
    name = "healthygan"
    Config = HealthyGANConfig
    scoring_networks = ("generator",)
    needs_unlabeled = True
    takes_holdout = True
    profiles = {
        # the original: 256 px RGB, width 64, 2048-channel critic, 400k iterations on a GPU
        "paper": {
            "config": {},
            "preprocessing": {"image_size": 256, "channels": 3, "top_crop": 0.08},
        },
        # ~21 minutes on 2 free CPU cores (chest, 2026-12-06). The original recipe first made to learn at this scale on
        # chest validation data (2026-11: lr 3e-4, the paper's 2 critic steps, a 5x identity weight that anchors the
        # translation); then each part below replaced the paper's by a rule written before its runs, decided on
        # validation data or wider non-test sets across four data sets (docs/experiments.md, the section in brackets):
        # nearest upsampling, as transposed convolutions drew the masks as 0/1 stripes, and a mask weight of 1, as at
        # 0.1 masks covering the image were the losses' cheapest solution (6); a critic on frozen EfficientNet-Lite0
        # features (8); its deficit plus the nearest-patch memory's maximum as the score (13), the critic's part weighted
        # down as it memorises B (15); every scan as the other methods get it, without histogram equalisation or the
        # top crop (14); the mask taught where the memory finds the scan unlike healthy ones, without which it emptied
        # out or filled the image (19); that mask as the heatmap (20); the generator padded by reflection (26).
        "cpu": {
            "config": {
                "lr": 3e-4,
                "width": 32,
                "residual_blocks": 6,
                "critic": "lite0",
                "critic_width": 64,
                "n_critic": 2,
                "lambda_id": 5.0,
                "lambda_mask": 1.0,
                "upsample": "nearest",
                "padding": "reflect",
                "score": "critic+nearest",
                "heatmap": "mask",
                "mask_target": 10.0,
                "iterations": 1000,
                "checkpoint_every": 100,
                "sample_every": 500,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests and smoke runs
        "tiny": {
            "config": {
                "width": 8,
                "residual_blocks": 1,
                "critic_width": 8,
                "critic_max_width": 32,
                "iterations": 20,
                "batch_size": 4,
                "checkpoint_every": 10,
                "sample_every": 10,
                "aucp_pool": 16,
                "ema_decay": 0.9,
            },
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        if c.selection not in ("aucp", "last"):
            raise ScanomalyError(f"selection must be 'aucp' or 'last', got {c.selection!r}")
        if c.score not in SCORES:
            raise ScanomalyError(f"score must be one of {SCORES}, got {c.score!r}")
        if c.heatmap not in HEATMAPS:
            raise ScanomalyError(f"heatmap must be one of {HEATMAPS}, got {c.heatmap!r}")
        if (self.scores_with_memory or c.mask_target) and (c.critic != "lite0" or c.score not in CRITIC_SCORES):
            # each setting that uses the memory, and the one that does without it
            used = [(setting, fix) for setting, fix, on in (
                (f"heatmap={c.heatmap}", "heatmap=mask", c.heatmap == "nearest"),
                (f"score={c.score}", "score=critic", c.score == "critic+nearest"),
                (f"mask_target={c.mask_target}", "mask_target=0", bool(c.mask_target))) if on]
            raise ScanomalyError(f"{' and '.join(u for u, _ in used)} {'use' if len(used) > 1 else 'uses'} the "
                                 "nearest-patch memory, which searches the pretrained critic's features: it needs "
                                 f"critic=lite0 and the critic's score (got critic={c.critic}, score={c.score}); "
                                 f"without the memory: --set {' '.join(fix for _, fix in used)}")
        if c.padding not in PADDINGS:  # checked once for both generators
            raise ScanomalyError(f"padding must be one of {PADDINGS}, got {c.padding!r}")
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run
        if c.generator == "stargan":
            self.generator = MaskedTranslator(p.channels, c.width, c.residual_blocks, c.upsample, c.padding)
        elif c.generator == "lite0":
            encoder = pf.build_extractor("efficientnet_lite0", c.encoder_weights, ENCODER_STAGES, torch.device("cpu"))
            self.generator = PretrainedMaskedTranslator(encoder, p.channels, c.width, c.residual_blocks, c.padding)
        else:
            raise ScanomalyError(f"generator must be 'stargan' or 'lite0', got {c.generator!r}")
        self.generator = self.generator.to(self.device)
        if c.critic == "patch":
            self.critic = PatchCritic(p.channels, p.image_size, c.critic_width, c.critic_max_width)
        elif c.critic == "lite0":
            trunk = pf.build_extractor("efficientnet_lite0", c.critic_weights, CRITIC_STAGES, torch.device("cpu"))
            self.critic = PretrainedPatchCritic(trunk, c.critic_width)
        else:
            raise ScanomalyError(f"critic must be 'patch' or 'lite0', got {c.critic!r}")
        self.critic = self.critic.to(self.device)
        self.feature_distance = self._feature_distance() if c.score == "features" else None
        self.critic_memorisation: float | None = None  # set by fit when the critic scores and healthy scans were held out
        self.healthy_patches: torch.Tensor | None = None  # heatmap="nearest": the coreset of B's trunk patches, set by fit
        self.fused_scales: torch.Tensor | None = None  # score="critic+nearest": set by fit
        if c.score in CRITIC_SCORES:  # the critic scores too, so it is part of the saved model
            self.scoring_networks = ("generator", "critic")
            self.critic_reference = torch.zeros_like(self._critic_map(self.critic, torch.zeros(1, p.channels, p.image_size, p.image_size, device=self.device)))

    @property
    def scores_with_memory(self) -> bool:
        """Whether scoring searches the nearest-patch memory (B's trunk patches, then kept with the model): for the
        heatmap or the score. The mask's target needs the memory too, in training only."""
        c = self.config
        return c.heatmap == "nearest" or c.score == "critic+nearest"

    @property
    def scoring_generator(self) -> MaskedTranslator:
        """The generator that scores: the EMA copy, with AUCp's chosen weights, after fit; the own one before."""
        return self.scoring["generator"]

    def _feature_distance(self) -> pf.FeatureDistance:
        c = self.config
        extractor = pf.build_extractor(c.score_backbone, c.score_backbone_weights, c.score_stages, self.device)
        return pf.FeatureDistance(extractor, c.score_sigma, c.score_input_size, c.score_pool)

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, holdout=None, work_dir=None, progress=True):
        if unlabeled is None:
            raise ScanomalyError("HealthyGAN trains on a known-healthy set B and a mixed unlabeled set A: give --unlabeled (or --from-labeled)")
        x_b, x_a = as_tensor(healthy), as_tensor(unlabeled)
        c = self.config
        # AUCp and the fused score's scales need healthy and unlabeled scans that training does not see; the mask
        # target's calibration needs unseen healthy ones
        needs_pool = c.selection == "aucp" or c.score == "critic+nearest"
        if holdout is None and (needs_pool or c.mask_target):
            x_b, x_hold = _split_off(x_b, c.holdout_fraction, c.seed)
        else:
            x_hold = None if holdout is None else as_tensor(holdout)
        if len(x_b) == 0 or len(x_a) == 0:
            raise ScanomalyError("HealthyGAN needs at least one healthy and one unlabeled training image")
        if c.mask_target and (x_hold is None or not len(x_hold)):
            raise ScanomalyError("mask_target calibrates the memory on healthy scans held out of training: give "
                                 "at least two healthy training images (or a hold-out set)")
        evaluate, pool = None, x_a[:0]
        if needs_pool and x_hold is not None and len(x_hold):
            # AUCp compares unseen healthy scans with *unseen* unlabeled ones: an unlabeled pool the
            # generator trained on would score low just because it was memorised (measured: AUCp < 0.5)
            x_a, pool = _split_off(x_a, c.holdout_fraction, c.seed)
            pool = pool[: c.aucp_pool]
        if c.score == "critic+nearest" and (0 if x_hold is None else len(x_hold)) + len(pool) < 2:
            raise ScanomalyError("score=critic+nearest scales its two parts on scans held out of training (a standard "
                                 "deviation needs two): give at least two healthy and two unlabeled training images "
                                 "(or a hold-out set)")
        if c.selection == "aucp" and x_hold is not None and len(x_hold):
            _warn_if_aucp_is_coarse(len(x_hold), len(pool))
            evaluate = lambda mods: self._aucp(mods, x_hold, pool)  # noqa: E731

        mask_target = None
        if self.scores_with_memory or c.mask_target:  # the critic's trunk is frozen: B's patches are the same before training as after
            self.healthy_patches = self.healthy_patch_bank(x_b)
        if c.mask_target:
            mask_target = MaskTarget(NearestHealthyPatch(self.critic, self.healthy_patches), x_hold)
        task = HealthyGANTask(self.generator, self.critic, c, mask_target)
        self.train_result = self._train(task, {"a": x_a, "b": x_b}, work_dir, progress, evaluate=evaluate,
                                        sample_batch={"a": x_a[:8]})
        best = self.train_result.best_state
        if evaluate is not None and best is not None:  # AUCp's choice, handed back in memory by the trainer
            for name in self.scoring_networks:
                self.scoring[name].load_state_dict(
                    {k[len(name) + 1:]: v for k, v in best.items() if k.startswith(name + ".")})
        self._ready_to_score()
        if c.score in CRITIC_SCORES:
            self.critic_reference = self._critic_reference(x_b)
            if x_hold is not None and len(x_hold):
                self.critic_memorisation = self._critic_memorisation(x_b, x_hold)
        if c.score == "critic+nearest":
            # the critic's part divided by its spread and weighted by how little it has learned B (section 15)
            weight = critic_weight(self.critic_memorisation)
            self.fused_scales = self.fused_score_scales(torch.cat([x_hold, pool])) / torch.tensor([weight, 1.0], device=self.device)
        return self

    @torch.no_grad()
    def fused_score_scales(self, unseen: torch.Tensor) -> torch.Tensor:
        """score="critic+nearest": (σ_critic, σ_memory), the standard deviations of the critic's deficit and of the
        nearest-patch map's maximum over scans that training did not see."""
        scorer = self._scorer(self.scoring, self.critic_reference, self.healthy_patches, heatmap="nearest")  # the memory's map
        parts = [torch.stack([s, m.flatten(1).amax(1)], 1).cpu()
                 for _, s, m in (self._run_scoring(scorer, unseen[i : i + 64]) for i in range(0, len(unseen), 64))]
        return torch.cat(parts).double().std(0).float().clamp_min(1e-12).to(self.device)

    @torch.no_grad()
    def healthy_patch_bank(self, healthy: torch.Tensor) -> torch.Tensor:
        """heatmap="nearest": a greedy k-center coreset (PatchCore's, seeded) of NEAREST_CORESET_FRACTION of
        the critic trunk's patch features of the healthy scans [M, C]. The trunk is frozen, so this depends on
        B alone, not on the training."""
        feats = self.trunk_patches(healthy)
        keep = greedy_coreset(feats, math.ceil(NEAREST_CORESET_FRACTION * len(feats)), seed=self.config.seed)
        return feats[keep].contiguous()

    @torch.no_grad()
    def trunk_patches(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Every patch feature the pretrained critic's trunk sees in `images`: [N·h·w, C], float32."""
        critic = self.scoring["critic"]
        return torch.cat([critic.features(images[i : i + batch_size].to(self.device)).float().permute(0, 2, 3, 1).flatten(0, 2)
                          for i in range(0, len(images), batch_size)])

    def _critic_memorisation(self, x_b: torch.Tensor, x_hold: torch.Tensor) -> float:
        """AUROC of the scoring critic's deficit, B's training scans (0) against the held-out healthy ones (1):
        0.5 when unseen healthy scans are judged like B's, towards 1 when the critic has learned B itself, and
        every scan it has not seen looks unhealthy. Label-free; warns at CRITIC_MEMORISATION_WARN or above."""
        s_b, s_hold = self._scores_with(self.scoring, x_b), self._scores_with(self.scoring, x_hold)
        auroc = float(roc_auc_score(np.r_[np.zeros(len(s_b)), np.ones(len(s_hold))], np.r_[s_b, s_hold]))
        if auroc >= CRITIC_MEMORISATION_WARN:
            warnings.warn(
                f"the critic tells its {len(s_b)} healthy training scans from {len(s_hold)} held-out healthy ones "
                f"(AUROC {auroc:.2f}): it has learned B itself, and unseen healthy scans will score as anomalies"
                + (f" (score=critic+nearest gives its part the weight {critic_weight(auroc):.2f})"
                   if self.config.score == "critic+nearest" else "") + ". Give more healthy scans.",
                stacklevel=3,
            )
        return auroc

    @torch.no_grad()
    def _critic_map(self, critic, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """The critic's mean patch map over `images`: [1, 1, f, f]."""
        maps = [critic(images[i : i + batch_size].to(self.device)).float().sum(0, keepdim=True)
                for i in range(0, len(images), batch_size)]
        return torch.stack(maps).sum(0) / len(images)

    def _critic_reference(self, healthy: torch.Tensor) -> torch.Tensor:
        return self._critic_map(self.scoring["critic"], healthy)

    @torch.no_grad()
    def _aucp(self, networks, healthy_holdout, unlabeled_pool) -> float:
        """Pseudo-AUC: held-out healthy as 0, the unlabeled pool as 1. No labels needed."""
        s0 = self._scores_with(networks, healthy_holdout)
        s1 = self._scores_with(networks, unlabeled_pool)
        y = np.r_[np.zeros(len(s0)), np.ones(len(s1))]
        return float(roc_auc_score(y, np.r_[s0, s1]))

    # -- score ----------------------------------------------------------------------------------
    def _scores_with(self, networks, images, batch_size=64) -> np.ndarray:
        # during training the critic's reference is not known yet: it shifts every score alike, so a
        # zero reference ranks the same
        scorer = self._scorer(networks, torch.zeros_like(self.critic_reference) if self.config.score in CRITIC_SCORES else None)
        out = [self._run_scoring(scorer, images[i : i + batch_size])[1].cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    def scoring_network(self) -> HealthyScorer:
        nearest = self.scores_with_memory
        if nearest and self.healthy_patches is None:
            raise ScanomalyError("the model's nearest-patch memory has no bank of healthy patches yet; fit or load it first")
        if self.config.score == "critic+nearest" and self.fused_scales is None:
            raise ScanomalyError("score=critic+nearest: the model has no score scales yet; fit or load it first")
        fused = self.fused_scales if self.config.score == "critic+nearest" else None
        return self._scorer(self.scoring, getattr(self, "critic_reference", None), self.healthy_patches if nearest else None,
                            fused)

    def _scorer(self, networks, critic_reference, healthy_patches=None, fused_scales=None, heatmap=None) -> HealthyScorer:
        """(During training no bank exists and AUCp needs only the critic's scores.) `heatmap`: the config's unless
        given."""
        deficit = None if critic_reference is None else CriticDeficit(networks["critic"], critic_reference)
        nearest = None if healthy_patches is None else NearestHealthyPatch(networks["critic"], healthy_patches)
        return HealthyScorer(networks["generator"], self.feature_distance, deficit, nearest, fused_scales,
                             heatmap or self.config.heatmap)

    # -- persistence (GANDetector): the scoring generator is the model, with the critic and its reference
    # when the critic scores (otherwise the critic is only needed to train). A pretrained scoring
    # backbone is reloaded from its package; a random one is saved with the model.
    def state_tensors(self):
        tensors = super().state_tensors()
        if self.feature_distance is not None:
            tensors.update(pf.backbone_state(self.feature_distance.extractor, self.config.score_backbone_weights))
        if self.config.score in CRITIC_SCORES:
            tensors[CRITIC_REFERENCE] = self.critic_reference
        if self.config.score == "critic+nearest":
            if self.fused_scales is None:
                raise ScanomalyError("score=critic+nearest: nothing to save, the model has no score scales (fit it first)")
            tensors[FUSED_SCALES] = self.fused_scales
        if self.scores_with_memory:
            if self.healthy_patches is None:
                raise ScanomalyError("nothing to save: the model's nearest-patch memory has no bank of healthy patches (fit it first)")
            tensors[HEALTHY_PATCHES] = self.healthy_patches
        return tensors

    def load_state_tensors(self, tensors):
        if self.config.score == "critic+nearest":
            tensors = dict(tensors)
            if FUSED_SCALES not in tensors:
                raise ScanomalyError("this model adds its critic's score and its patch memory but was saved without their scales")
            self.fused_scales = tensors.pop(FUSED_SCALES).float().to(self.device)
        if self.config.score in CRITIC_SCORES:
            tensors = dict(tensors)
            if CRITIC_REFERENCE not in tensors:
                raise ScanomalyError("this model scores with its critic but was saved without the critic's reference")
            self.critic_reference = tensors.pop(CRITIC_REFERENCE).to(self.device)
        if self.scores_with_memory:
            tensors = dict(tensors)
            if HEALTHY_PATCHES not in tensors:
                raise ScanomalyError("this model keeps a memory of healthy patches but was saved without them")
            self.healthy_patches = tensors.pop(HEALTHY_PATCHES).float().to(self.device)
        super().load_state_tensors(tensors)
        if self.feature_distance is not None:
            pf.load_backbone_state(self.feature_distance.extractor, self.config.score_backbone_weights, tensors)

    def extra_state(self):
        r = self.train_result
        if r is None:
            return {}
        # without AUCp (selection=last, or nothing held out) the model is the final iteration's
        selected = r.best_step if r.best_step is not None else r.steps
        return {"trained_steps": r.steps, "selected_step": selected, "aucp": r.best_metric, "aucp_history": r.history,
                "critic_b_vs_holdout_auroc": self.critic_memorisation}


CRITIC_REFERENCE = "critic_reference"  # its name among the saved tensors
HEALTHY_PATCHES = "healthy_patches"
FUSED_SCALES = "fused_score_scales"


# The critic's deficit, B's training scans against held-out healthy ones (AUROC), at every checkpoint of the cpu
# profile's 1,000 iterations on four data sets (docs/experiments.md, section 7): 0.45-0.52 with 603 healthy chest
# X-rays in B and 0.51-0.61 with 810 lgg_flair slices; 0.67-0.89 with the 31 and 48 of brain_tumor_small and BUSI
# (0.78-0.83 at AUCp's picks), whose test AUROCs then were 0.74 and 0.54.
CRITIC_MEMORISATION_WARN = 0.75


def critic_weight(memorisation: float | None) -> float:
    """score="critic+nearest": the weight w of the critic's part, clip(2 (1 − m), 0, 1) for its memorisation AUROC m
    (B's training scans against held-out healthy ones): full at chance (m ≤ 0.5), half at 0.75, none when it tells
    every training scan from every held-out one, whose verdict on unseen scans is then "not in B" more than "not
    healthy" (docs/experiments.md, section 15). Unmeasured (nothing held out): full."""
    return 1.0 if memorisation is None else float(min(max(2.0 * (1.0 - memorisation), 0.0), 1.0))


# Below this many held-out images per side, AUCp moves in steps of several hundredths from one
# image's rank and picks checkpoints almost at random (measured on BUSI / brain_tumor_small with
# 3-8 per side: the first checkpoint won both times, BENCHMARKS.md).
AUCP_MIN_PER_SIDE = 20


def _warn_if_aucp_is_coarse(n_healthy: int, n_unlabeled: int) -> None:
    if min(n_healthy, n_unlabeled) < AUCP_MIN_PER_SIDE:
        warnings.warn(
            f"AUCp checkpoint selection rests on only {n_healthy} held-out healthy and {n_unlabeled} held-out unlabeled "
            f"image(s) (fewer than {AUCP_MIN_PER_SIDE} a side): its choice is coarse. Give more images, a larger "
            "holdout_fraction, or selection=last (CLI: --set selection=last) to keep the final checkpoint.",
            stacklevel=3,
        )


def _split_off(x: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold a seeded `fraction` of x out of training (at least one image when x has two or more)."""
    kept, held = split_off_indices(len(x), fraction, seed)
    return x[kept], x[held]


def split_off_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_split_off`'s choice as indices (kept, held out): which records of a split the fit held out."""
    n_hold = int(round(n * fraction))
    n_hold = min(max(n_hold, 1 if n > 1 else 0), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return perm[n_hold:], perm[:n_hold]
