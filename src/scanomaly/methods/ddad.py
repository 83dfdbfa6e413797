"""DDAD: Dual-Distribution Discrepancy for anomaly detection (Cai et al., MICCAI 2022; with the
self-supervised refinement of the extended version, Medical Image Analysis 2023).

The setting is HealthyGAN's: a known-healthy set B and an unlabeled set A that holds some abnormal
scans. Two ensembles of autoencoders learn the two distributions, and where they disagree is the
anomaly.

1. Normative distribution module (NDM): K autoencoders (K = 3, latent size 16, 64x64 grayscale),
   each trained on B only.
2. Unified distribution module (UDM): K more autoencoders, each trained on B ∪ A. Having seen the
   anomalies in A, they reconstruct anomalies better than the NDM does.
   Loss (both modules): MSE for a plain AE (`backbone="ae"`); the AE-U variant (`backbone="aeu"`)
   also predicts a per-pixel log-variance logσ² and minimises mean(exp(−logσ²)·(x − x̂)²) + mean(logσ²).
   Adam, lr 5e-4, betas (0.5, 0.999), batch 64, 250 epochs.
3. Discrepancy maps, per pixel:
       intra-discrepancy  = standard deviation of the K NDM reconstructions (needs no unlabeled data)
       inter-discrepancy  = |mean of the UDM reconstructions − mean of the NDM reconstructions|
   With AE-U both are divided by the square root of the predicted variance σ² (the NDM members'
   mean), so that regions the model is unsure of everywhere count less. Image score = mean of the map.
4. Anomaly score refinement (ASR, `refine="dual"`): a 3-layer CNN (conv3x3 with 128 channels,
   BatchNorm, ReLU; then a conv to one channel) maps the [inter, intra] maps to an anomaly map. It is
   trained with a focal loss on synthetic anomalies: on half of the healthy training scans, a patch
   of 5-20% of the image's width and height, cut from another healthy scan, is blended in, and its
   mask is the target. Adam, lr 1e-4, weight decay 1e-4, batch 8, 100 epochs. Image score = mean
   of its output map (sigmoid).

`score` picks the map that scores and draws the heatmap: "intra" (step 3, NDM only: the authors'
ablation without unlabeled data), "inter" (step 3) or "refined" (step 4). It changes nothing in
training, so one trained model scores all three ways.

What differs from the original, and why:
- The autoencoders follow the authors' layout (four stride-2 conv3x3-BN-ReLU stages of 16-128
  channels, fully connected layers of 2048 units around the latent code, a mirrored decoder with
  transposed convolutions) in this project's code; images are in [-1, 1] and the decoder's output
  is linear.
- Training runs in the project's one loop (`training.loop`): the 2K autoencoders are the phases of
  one task and step on the same batches each iteration (B for the NDM, B ∪ A for the UDM), so they
  differ by their initial weights only (the original trains each network on its own). One
  "iteration" is one step of every member; `epochs` counts passes over B ∪ A, so the NDM's members,
  on the smaller B, see more passes than the UDM's. Checkpoints, resume and progress are the loop's.
- The synthetic anomalies blend the foreign patch with a factor drawn from U(0.5, 1) and use the
  patch's binary mask as the target; the focal loss uses γ = 2 without class weighting.
- Checkpoint choice. The autoencoders are kept at their last step: reconstruction training has
  no adversarial oscillation for a pseudo-AUC to pick from, and choosing their checkpoint with
  the unlabeled images would let the intra-only ablation see A. The refinement network, trained
  on synthetic anomalies only, is chosen label-free as HealthyGAN's generator is (`selection="aucp"`):
  at each checkpoint the pseudo-AUC of held-out healthy scans (0) against held-out unlabeled scans
  (1, 10% of A kept out of training) scores its maps; the best checkpoint is kept.
- The cpu profile trains smaller networks for fewer iterations (see its comment); the paper profile is
  the original's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..detector import ReconstructionDetector, as_tensor, load_module_state, module_state, register
from ..errors import ScanomalyError
from ..nn.blocks import num_halvings
from ..training.loop import GANTask, GANTrainer, LoopConfig, Phase
from .healthygan import _split_off, _warn_if_aucp_is_coarse

BACKBONES = ("ae", "aeu")
REFINEMENTS = ("none", "dual")
SCORES = ("intra", "inter", "refined")


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Autoencoder(nn.Module):
    """x [N, C, S, S] -> (reconstruction [N, C, S, S], log-variance [N, C, S, S] or None).

    Encoder: stride-2 conv3x3 + BN + ReLU stages of width, 2·width, 4·width, 8·width channels down to
    S/16; Linear(·, hidden) + BN + ReLU + Linear(hidden, latent). The decoder mirrors it with
    transposed conv4x4 stages; its last conv1x1 gives C channels (AE) or 2C (AE-U: mean, logσ²)."""

    def __init__(self, channels: int, image_size: int, latent_size: int = 16, width: int = 16, hidden: int = 2048,
                 uncertainty: bool = False):
        super().__init__()
        stages = 4
        num_halvings(image_size, image_size // 2**stages)  # raises unless S is 16 times a power of two
        self.channels, self.uncertainty = channels, uncertainty
        widths = [width * 2**i for i in range(stages)]
        self.grid, self.bottleneck = image_size // 2**stages, widths[-1]
        down, ch = [], channels
        for w in widths:
            down += [nn.Conv2d(ch, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            ch = w
        self.down = nn.Sequential(*down)
        flat = widths[-1] * self.grid**2
        self.to_latent = nn.Sequential(nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, latent_size))
        self.from_latent = nn.Sequential(nn.Linear(latent_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, flat))
        up = []
        for a, b in zip(widths[::-1], widths[::-1][1:] + [width]):
            up += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*up)
        self.head = nn.Conv2d(width, channels * (2 if uncertainty else 1), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.to_latent(self.down(x).flatten(1))
        # the batch axis as -1: an ONNX export keeps it dynamic
        h = self.from_latent(z).view(-1, self.bottleneck, self.grid, self.grid)
        out = self.head(self.up(h))
        if self.uncertainty:
            return out[:, : self.channels], out[:, self.channels :]
        return out, None


class Refiner(nn.Module):
    """ASR: [inter, intra] maps [N, 2, S, S] -> anomaly logits [N, 1, S, S]; three conv3x3 layers."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 3, 1, 1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps)


# ---------------------------------------------------------------------------------------------
# losses and the synthetic anomalies
# ---------------------------------------------------------------------------------------------
def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
    """Step 2's loss: MSE (AE), or mean(exp(−logσ²)·(x − x̂)²) + mean(logσ²) (AE-U)."""
    err = (x - reconstruction.float()) ** 2
    if log_var is None:
        return err.mean()
    log_var = log_var.float()
    return (torch.exp(-log_var) * err).mean() + log_var.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels: −(1 − p_t)^γ · log p_t."""
    logits = logits.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return ((1 - p_t) ** gamma * ce).mean()


def paste_foreign_patches(
    x: torch.Tensor, probability: float = 0.5, size_range: tuple[float, float] = (0.05, 0.2),
    blend_range: tuple[float, float] = (0.5, 1.0), generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4's synthetic anomalies: on each image with `probability`, a rectangle of `size_range` of
    the image's height and width, cut from another image of the batch at a random place, blended in at
    a random place with a factor from `blend_range`. Returns (images, masks [N, 1, S, S] in {0, 1})."""
    n, _, height, width = x.shape
    out, mask = x.clone(), torch.zeros(n, 1, height, width, dtype=x.dtype, device=x.device)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def randint(hi: int) -> int:  # in [0, hi]
        return int(torch.randint(hi + 1, (), generator=generator))

    for i in range(n):
        if float(torch.rand((), generator=generator)) >= probability:
            continue
        h = max(1, round(uniform(*size_range) * height))
        w = max(1, round(uniform(*size_range) * width))
        source = x[(i + 1 + randint(n - 2)) % n] if n > 1 else x[i]  # another image where there is one
        sy, sx, dy, dx = randint(height - h), randint(width - w), randint(height - h), randint(width - w)
        alpha = uniform(*blend_range)
        patch = source[:, sy : sy + h, sx : sx + w]
        out[i, :, dy : dy + h, dx : dx + w] = (1 - alpha) * x[i, :, dy : dy + h, dx : dx + w] + alpha * patch
        mask[i, :, dy : dy + h, dx : dx + w] = 1
    return out, mask


# ---------------------------------------------------------------------------------------------
# step 3-4: the discrepancy maps and the score, as one network (what score and ONNX export run)
# ---------------------------------------------------------------------------------------------
def ensemble_outputs(members: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The members' reconstructions [K, N, C, S, S] and predicted variances σ² [K, N, C, S, S] (AE-U) or None."""
    outs = [m(x) for m in members]
    recs = torch.stack([r.float() for r, _ in outs])
    if outs[0][1] is None:
        return recs, None
    return recs, torch.stack([torch.exp(v.float()) for _, v in outs])


def intra_discrepancy(recs: torch.Tensor) -> torch.Tensor:
    """Per-pixel standard deviation over the K members (unbiased, as torch.std), channel mean: [N, S, S]."""
    k = recs.shape[0]
    mean = recs.mean(0)
    return torch.sqrt(((recs - mean) ** 2).sum(0) / (k - 1)).mean(1)


def inter_discrepancy(recs_ndm: torch.Tensor, recs_udm: torch.Tensor) -> torch.Tensor:
    """|mean UDM reconstruction − mean NDM reconstruction|, channel mean: [N, S, S]."""
    return (recs_udm.mean(0) - recs_ndm.mean(0)).abs().mean(1)


class DiscrepancyScorer(nn.Module):
    """x -> (NDM mean reconstruction, image scores [N], anomaly map [N, S, S]) for one `score` choice.

    Every network the score needs is in this one module (the K NDM members; the K UDM members for
    "inter" and "refined"; the refiner for "refined"), so an ONNX export holds them all in one graph."""

    def __init__(self, ndm: nn.ModuleList, udm: nn.ModuleList | None, refiner: Refiner | None, score: str):
        super().__init__()
        if score != "intra" and udm is None:
            raise ScanomalyError(f"ddad: score={score!r} needs the unified module")
        if score == "refined" and refiner is None:
            raise ScanomalyError("ddad: score='refined' needs refine='dual'")
        self.ndm, self.score = ndm, score
        self.udm = udm if score != "intra" else None
        self.refiner = refiner if score == "refined" else None

    def discrepancies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(NDM mean reconstruction, intra map, inter map or None), divided by σ for AE-U."""
        recs, var = ensemble_outputs(self.ndm, x)
        intra = intra_discrepancy(recs)
        inter = None if self.udm is None else inter_discrepancy(recs, ensemble_outputs(self.udm, x)[0])
        if var is not None:
            sigma = torch.sqrt(var.mean(0).mean(1))
            intra = intra / sigma
            inter = None if inter is None else inter / sigma
        return recs.mean(0), intra, inter

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reconstruction, intra, inter = self.discrepancies(x)
        if self.score == "intra":
            heatmap = intra
        elif self.score == "inter":
            heatmap = inter
        else:
            heatmap = torch.sigmoid(self.refiner(torch.stack([inter, intra], 1)).float())[:, 0]
        return reconstruction, heatmap.flatten(1).mean(1), heatmap


# ---------------------------------------------------------------------------------------------
# training tasks: what the project's loop runs
# ---------------------------------------------------------------------------------------------
class EnsembleTask(GANTask):
    """Steps 1-2: one phase per autoencoder; NDM members on B, UDM members on B ∪ A."""

    def __init__(self, ndm: nn.ModuleList, udm: nn.ModuleList, cfg: "DDADConfig"):
        self._modules = {**{f"ndm{k}": m for k, m in enumerate(ndm)}, **{f"udm{k}": m for k, m in enumerate(udm)}}
        self._optimizers = {name: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
                            for name, m in self._modules.items()}

    def modules(self):
        return self._modules

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [Phase(name, optimizer=name, modules=(name,)) for name in self._modules]

    def loss(self, phase, batch):
        x = batch["b"] if phase.startswith("ndm") else batch["ab"]
        loss = reconstruction_loss(x, *self._modules[phase](x))
        return loss, {f"{phase}/loss": loss.item()}

    def sample_rows(self, batch, nets):
        x = batch["ab"]
        ndm = nn.ModuleList(m for name, m in nets.items() if name.startswith("ndm"))
        udm = nn.ModuleList(m for name, m in nets.items() if name.startswith("udm"))
        reconstruction, intra, inter = DiscrepancyScorer(ndm, udm, None, "inter").discrepancies(x)
        return [("input", x), ("NDM mean", reconstruction), ("intra", intra[:, None]), ("inter", inter[:, None])]


class RefinementTask(GANTask):
    """Step 4: the refiner learns synthetic anomalies' masks from the frozen modules' maps."""

    def __init__(self, refiner: Refiner, maps: DiscrepancyScorer, cfg: "DDADConfig"):
        self.refiner, self.maps, self.cfg = refiner, maps, cfg
        self._optimizers = {"refiner": torch.optim.Adam(refiner.parameters(), lr=cfg.refine_lr,
                                                        weight_decay=cfg.refine_weight_decay)}

    def modules(self):
        return {"refiner": self.refiner}

    def optimizers(self):
        return self._optimizers

    def phases(self):
        return [Phase("refiner", optimizer="refiner", modules=("refiner",))]

    def loss(self, phase, batch):
        c = self.cfg
        x, target = paste_foreign_patches(batch["b"], c.anomaly_probability, (c.patch_min, c.patch_max))
        with torch.no_grad():
            _, intra, inter = self.maps.discrepancies(x)
        loss = focal_loss(self.refiner(torch.stack([inter, intra], 1)), target, c.focal_gamma)
        return loss, {"refiner/focal": loss.item()}


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
@dataclass
class DDADConfig:
    backbone: str = "ae"  # "ae" (MSE) or "aeu" (with per-pixel log-variance)
    ensemble: int = 3  # K, members per module
    latent_size: int = 16
    width: int = 16  # channels of the first encoder stage (then 2x, 4x, 8x)
    hidden: int = 2048  # units of the fully connected layers around the latent code
    lr: float = 5e-4
    betas: tuple = (0.5, 0.999)
    batch_size: int = 64
    epochs: int = 250  # passes over B ∪ A (the UDM's set), unless `iterations` is set
    iterations: int = 0  # > 0: steps of every member (instead of `epochs`)
    refine: str = "dual"  # "dual": train the ASR refiner on [inter, intra]; "none": no second stage
    score: str = "refined"  # "intra" | "inter" | "refined": which map scores (changes nothing in training)
    refine_width: int = 128
    refine_epochs: int = 100  # passes over B, unless `refine_iterations` is set
    refine_iterations: int = 0  # > 0: steps of the refiner (instead of `refine_epochs`)
    refine_batch_size: int = 8
    refine_lr: float = 1e-4
    refine_weight_decay: float = 1e-4
    focal_gamma: float = 2.0
    anomaly_probability: float = 0.5  # of a training scan getting a synthetic anomaly
    patch_min: float = 0.05  # patch height / width as a fraction of the image's
    patch_max: float = 0.2
    hflip: bool = False  # the original does not flip
    selection: str = "aucp"  # the refiner's checkpoint: "aucp" (label-free, as HealthyGAN) or "last"
    holdout_fraction: float = 0.1  # of B (when no holdout set is given) and of A, kept out of training for AUCp
    aucp_pool: int = 256  # at most this many held-out unlabeled images are scored for AUCp
    checkpoint_every: int = 500  # iterations of each stage
    seed: int = 0


@register
class DDAD(ReconstructionDetector):
    name = "ddad"
    Config = DDADConfig
    needs_unlabeled = True
    takes_holdout = True  # the refiner's AUCp compares held-out healthy scans with held-out unlabeled ones
    profiles = {
        # the original: 64 px grayscale, K = 3, 250 epochs of the autoencoders, 100 of the refiner
        "paper": {"config": {}, "preprocessing": {"image_size": 64, "channels": 1}},
        # ~10 minutes on one CPU thread for the chest X-ray benchmark (B = 603, A = 957 images). The
        # original's networks at batch 64 take ~1.4 s per autoencoder step on one thread (measured), 8 s
        # per iteration of all six: far beyond the budget. Half the width (8-64 channels), 512 hidden
        # units and batch 32 take ~0.16 s; 400 iterations are ~8 passes over B ∪ A (~21 over B). The
        # refiner at width 32 (the original: 128; ~0.16 s vs 1.8 s a step) takes 300 steps at batch 8
        # (~4 passes over B). Set from timings before any benchmark ran, not tuned on results.
        # The score is the inter-discrepancy, chosen on validation (chest X-rays, seed 0: 67 held-out
        # healthy vs 67 validation abnormals, AUROC intra 0.527, inter 0.789, refined 0.549). At this
        # budget neither map is higher inside the synthetic patches than outside them (64 healthy chest
        # scans: mean inside / outside 0.89 intra, 0.91 inter), so the refiner has little to learn from.
        # `--set score=refined` scores with it all the same.
        "cpu": {
            "config": {"width": 8, "hidden": 512, "batch_size": 32, "iterations": 400,
                       "refine_width": 32, "refine_iterations": 300, "checkpoint_every": 100, "score": "inter"},
            "preprocessing": {"image_size": 64, "channels": 1},
        },
        # seconds, for tests
        "tiny": {
            "config": {"ensemble": 2, "width": 4, "hidden": 32, "latent_size": 8, "batch_size": 4,
                       "iterations": 12, "refine_width": 8, "refine_iterations": 6,
                       "refine_batch_size": 4, "checkpoint_every": 6, "aucp_pool": 16},
            "preprocessing": {"image_size": 32, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c, p = self.config, self.preprocessing
        for option, value, allowed in (("backbone", c.backbone, BACKBONES), ("refine", c.refine, REFINEMENTS),
                                       ("score", c.score, SCORES), ("selection", c.selection, ("aucp", "last"))):
            if value not in allowed:
                raise ScanomalyError(f"ddad: {option} must be one of {allowed}, got {value!r}")
        if c.score == "refined" and c.refine == "none":
            raise ScanomalyError("ddad: score='refined' needs refine='dual' (or choose score=inter / intra)")
        if c.ensemble < 2:
            raise ScanomalyError(f"ddad: the intra-discrepancy is a standard deviation over members: ensemble must be >= 2, got {c.ensemble}")
        if p.image_size % 16:
            raise ScanomalyError(f"ddad: image_size must be a multiple of 16 (four stride-2 stages), got {p.image_size}")
        torch.manual_seed(c.seed)  # the initial weights are part of the seeded run

        def member() -> Autoencoder:
            return Autoencoder(p.channels, p.image_size, c.latent_size, c.width, c.hidden, c.backbone == "aeu")

        self.ndm = nn.ModuleList(member() for _ in range(c.ensemble)).to(self.device)
        self.udm = nn.ModuleList(member() for _ in range(c.ensemble)).to(self.device)
        self.refiner = Refiner(c.refine_width).to(self.device) if c.refine == "dual" else None
        self.train_result = None  # steps 1-2
        self.refine_result = None  # step 4

    def _networks(self) -> dict[str, nn.Module]:
        nets = {"ndm": self.ndm, "udm": self.udm}
        return {**nets, "refiner": self.refiner} if self.refiner is not None else nets

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, holdout=None, work_dir=None, progress=True):
        if unlabeled is None:
            raise ScanomalyError("DDAD trains on a known-healthy set B and a mixed unlabeled set A: give --unlabeled (or --from-labeled)")
        x_b, x_a = as_tensor(healthy), as_tensor(unlabeled)
        c = self.config
        work_dir = None if work_dir is None else Path(work_dir)
        use_aucp = c.selection == "aucp" and c.refine == "dual"
        x_hold = pool = None
        if use_aucp:  # as HealthyGAN: unseen healthy scans against unseen unlabeled ones
            x_b, x_hold = _split_off(x_b, c.holdout_fraction, c.seed) if holdout is None else (x_b, as_tensor(holdout))
            x_a, pool = _split_off(x_a, c.holdout_fraction, c.seed)
            pool = pool[: c.aucp_pool]
            _warn_if_aucp_is_coarse(len(x_hold), len(pool))
        if len(x_b) == 0 or len(x_a) == 0:
            raise ScanomalyError("DDAD needs at least one healthy and one unlabeled training image")
        x_ab = torch.cat([x_b, x_a])

        # steps 1-2: the NDM on B, the UDM on B ∪ A
        iterations = c.iterations if c.iterations > 0 else c.epochs * -(-len(x_ab) // c.batch_size)
        trainer = GANTrainer(
            EnsembleTask(self.ndm, self.udm, c), {"b": x_b, "ab": x_ab}, self._settings(iterations, c.batch_size),
            None if work_dir is None else work_dir / "ensembles", self.device, progress,
            sample_batch={"b": x_b[:8], "ab": x_ab[-8:]}, precision=self.precision,
        )
        self.train_result = trainer.fit()
        self.ndm.eval()
        self.udm.eval()

        # step 4: the refiner on synthetic anomalies in B
        if self.refiner is not None:
            maps = DiscrepancyScorer(self.ndm, self.udm, None, "inter")
            for p in maps.parameters():
                p.requires_grad_(False)
            evaluate = None
            if use_aucp and len(x_hold) and len(pool):
                evaluate = lambda mods: self._aucp(mods["refiner"], x_hold, pool)  # noqa: E731
            iterations = (c.refine_iterations if c.refine_iterations > 0
                          else c.refine_epochs * -(-len(x_b) // c.refine_batch_size))
            refine_dir = None if work_dir is None else work_dir / "refinement"
            trainer = GANTrainer(RefinementTask(self.refiner, maps, c), {"b": x_b},
                                 self._settings(iterations, c.refine_batch_size), refine_dir, self.device, progress, evaluate,
                                 precision=self.precision)
            self.refine_result = trainer.fit()
            best = self.refine_result.best_state
            if evaluate is not None and best is not None:  # AUCp's choice, handed back in memory by the trainer
                self.refiner.load_state_dict({k[len("refiner."):]: v for k, v in best.items() if k.startswith("refiner.")})
            self.refiner.eval()
        return self

    def _settings(self, iterations: int, batch_size: int) -> LoopConfig:
        """The loop's settings for one stage (the two stages differ in length and batch): no learning-rate
        decay and no EMA (the original has neither)."""
        c = self.config
        return LoopConfig(iterations=iterations, batch_size=batch_size, seed=c.seed, lr_decay_fraction=0.0,
                          ema_decay=0.0, hflip=c.hflip, checkpoint_every=c.checkpoint_every,
                          sample_every=c.checkpoint_every)

    @torch.no_grad()
    def _aucp(self, refiner, healthy_holdout, unlabeled_pool, batch_size=64) -> float:
        """Pseudo-AUC of the refined score: held-out healthy as 0, the held-out unlabeled pool as 1. No labels."""
        scorer = DiscrepancyScorer(self.ndm, self.udm, refiner, "refined")

        def scores(x):
            return torch.cat([self._run_scoring(scorer, x[i : i + batch_size])[1].cpu() for i in range(0, len(x), batch_size)]).numpy()

        s0, s1 = scores(healthy_holdout), scores(unlabeled_pool)
        return float(roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0, s1]))

    # -- score: the chosen discrepancy map ---------------------------------------------------------
    def scoring_network(self) -> DiscrepancyScorer:
        return DiscrepancyScorer(self.ndm, self.udm, self.refiner, self.config.score)

    # -- persistence: every network (the score choice is in the config) ---------------------------
    def state_tensors(self):
        return module_state(self._networks())

    def load_state_tensors(self, tensors):
        load_module_state(self._networks(), tensors)

    def extra_state(self):
        out = {}
        if self.train_result is not None:
            out["trained_steps"] = self.train_result.steps
        r = self.refine_result
        if r is not None:
            out["refine_steps"] = r.steps
            out["selected_refine_step"] = r.best_step if r.best_step is not None else r.steps
            out["aucp"] = r.best_metric
            out["aucp_history"] = r.history
        return out
