"""PatchCore: Towards Total Recall in Industrial Anomaly Detection (Roth et al., CVPR 2022).

1. Locally aware patch features. Two mid-level stages of a pretrained CNN (Wide-ResNet-50-2:
   layer2 and layer3) are each averaged over a 3x3 neighbourhood (avg pool 3, stride 1, pad 1);
   the deeper one is bilinearly upsampled to the first one's grid and the two are concatenated.
2. Memory bank. The patch features of all healthy training images.
3. Coreset subsampling. Greedy k-center selection keeps a fraction of the bank (1% in the paper)
   that covers it: each step adds the patch farthest from everything chosen so far. Distances for
   the selection are computed on a sparse random projection to 128 dimensions (Johnson-
   Lindenstrauss); the bank keeps the full features.
4. Scoring. A test patch's score is the distance to its nearest memory item. The image score is
   the largest patch score s* = ||m_test - m*||, re-weighted by how isolated its nearest item m*
   is in the bank:  s = (1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)) s*,
   with N_b(m*) the b = 9 nearest memory items of m* (m* itself included). The anomaly map is the
   patch-score grid upsampled to the image size and smoothed with a Gaussian (sigma = 4).

cpu profile: EfficientNet-Lite0's stride-8 and stride-16 stages (stage3, 40 ch; stage5, 112 ch;
the last block at each resolution, as layer2/layer3 are for ResNets) give 152-d patch features.
The coreset keeps 10% (the paper's 1% was chosen for 224-px MVTec images with a 1536-d bank; at
128 px there are 4x fewer patches per image, and 10% costs little at this feature size).

The greedy selection is exact but prunes with the triangle inequality (as in Elkan's k-means):
a point x assigned to centre a(x) at distance r(x) can only move to a new centre c if
||a(x) - c|| < 2 r(x), so only those points' distances are computed. This keeps the selection
well below the feature-extraction time even at 10% of ~10^5 patches on two CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..detector import Detector, as_tensor, register
from ..errors import ScanomalyError
from . import _patch_features as pf

DISTANCE_BLOCK = 1 << 23  # entries of one query x memory distance block (32 MiB in float32)


@dataclass
class PatchcoreConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = "imagenet"  # "imagenet", a local weights file, or "random"
    stages: tuple[str, ...] = ("stage3", "stage5")
    coreset_fraction: float = 0.1  # share of the training patches kept in the memory bank (paper: 0.01)
    projection_dim: int = 128  # sparse random projection used for the coreset distances (paper: 128)
    num_neighbors: int = 9  # b of the image-score re-weighting
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the input
    seed: int = 0  # coreset start point and random projection
    batch_size: int = 32  # images per backbone pass during fit


# ------------------------------------------------------------------------------------------
# coreset subsampling
# ------------------------------------------------------------------------------------------
def sparse_random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """[dim_in, dim_out] "very sparse" random projection (Li, Hastie & Church 2006): entries are
    +-sqrt(1 / (density * dim_out)) with probability density / 2 each and 0 otherwise, density = 1 / sqrt(dim_in)."""
    density = 1.0 / math.sqrt(dim_in)
    u = torch.rand(dim_in, dim_out, generator=generator)
    signs = torch.where(u < density / 2, -1.0, torch.where(u < density, 1.0, 0.0))
    return signs * math.sqrt(1.0 / (density * dim_out))


def _distances_to(points: torch.Tensor, center: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    return torch.cat([(points[s : s + chunk] - center).norm(dim=1) for s in range(0, points.shape[0], chunk)])


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0
) -> torch.Tensor:
    """Indices [n_select] of a greedy k-center coreset of `features` [N, D], in the order chosen.

    Step t adds argmax_x min_{c chosen} ||x - c|| (on the projected features when D > projection_dim).
    """
    n = features.shape[0]
    n_select = max(1, min(int(n_select), n))
    gen = torch.Generator().manual_seed(seed)
    z = features
    if projection_dim and features.shape[1] > projection_dim:
        proj = sparse_random_projection(features.shape[1], projection_dim, gen).to(features.device, features.dtype)
        z = torch.cat([features[s : s + 65536] @ proj for s in range(0, n, 65536)])
    first = int(torch.randint(n, (1,), generator=gen))

    chosen = torch.empty(n_select, dtype=torch.long, device=z.device)
    centers = torch.empty(n_select, z.shape[1], dtype=z.dtype, device=z.device)
    chosen[0], centers[0] = first, z[first]
    radius = _distances_to(z, z[first])  # distance of every point to its nearest chosen centre
    owner = torch.zeros(n, dtype=torch.long, device=z.device)  # which chosen centre that is
    for t in range(1, n_select):
        i = int(torch.argmax(radius))
        c = z[i]
        chosen[t], centers[t] = i, c
        # x can only get closer to c if ||c - a(x)|| < 2 r(x) (triangle inequality); skip the rest
        center_dist = (centers[:t] - c).norm(dim=1)
        cand = torch.nonzero(center_dist[owner] < 2 * radius).squeeze(1)
        d = (z[cand] - c).norm(dim=1)
        closer = d < radius[cand]
        moved = cand[closer]
        radius[moved] = d[closer]
        owner[moved] = t
    return chosen


# ------------------------------------------------------------------------------------------
# nearest neighbours in the memory bank
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def nearest_neighbors(queries: torch.Tensor, memory: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-NN of queries [Q, D] in memory [M, D] -> (distances [Q, k], indices [Q, k]), ascending.

    Distance blocks of at most DISTANCE_BLOCK entries (||q||^2 - 2 q.m + ||m||^2, one matmul each);
    the returned distances are recomputed directly from the chosen pairs, so they are exact."""
    k = min(k, memory.shape[0])
    m_sq = (memory * memory).sum(1)
    rows = max(1, DISTANCE_BLOCK // memory.shape[0])
    idx = []
    for s in range(0, queries.shape[0], rows):
        q = queries[s : s + rows]
        d2 = torch.addmm(m_sq.unsqueeze(0), q, memory.t(), alpha=-2.0)  # + ||q||^2 does not change the order
        idx.append(torch.topk(d2, k, dim=1, largest=False).indices)
    idx = torch.cat(idx)
    dist = (queries.unsqueeze(1) - memory[idx]).norm(dim=-1)
    dist, order = dist.sort(dim=1)  # the exact distances may reorder near-ties
    return dist, idx.gather(1, order)


def reweighted_image_score(
    patch_feats: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor, memory: torch.Tensor, b: int
) -> torch.Tensor:
    """Image scores [B] from patch features [B, P, D], patch scores [B, P] and nearest items [B, P].

    s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test - m||)) * s*, computed as 1 - exp(s* - logsumexp(.))."""
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    p_star = patch_scores.argmax(1)
    s_star = patch_scores[rows, p_star]
    m_test = patch_feats[rows, p_star]  # [B, D]
    m_star = memory[nn_idx[rows, p_star]]  # [B, D]
    _, support = nearest_neighbors(m_star, memory, k=b)  # N_b(m*): m* is its own nearest item
    dists = (m_test.unsqueeze(1) - memory[support]).norm(dim=-1)  # [B, b]
    weight = 1.0 - torch.exp(s_star - torch.logsumexp(dists, dim=1))
    return weight * s_star


# ------------------------------------------------------------------------------------------
# the detector
# ------------------------------------------------------------------------------------------
@register
class Patchcore(Detector):
    name = "patchcore"
    Config = PatchcoreConfig
    profiles = {
        "cpu": {
            "config": {"backbone": "efficientnet_lite0", "backbone_weights": "imagenet", "stages": ("stage3", "stage5"), "coreset_fraction": 0.1},
            "preprocessing": {"image_size": 128, "channels": 1},
        },
        "paper": {
            # torchvision's ImageNet Wide-ResNet-50-2 is not bundled: pass backbone_weights=/path/to/wide_resnet50_2-95faca4d.pth
            "config": {"backbone": "wide_resnet50_2", "backbone_weights": "imagenet", "stages": ("layer2", "layer3"), "coreset_fraction": 0.01},
            "preprocessing": {"image_size": 224, "channels": 1},
        },
        "tiny": {  # random weights: for fast tests, needs no extra package
            "config": {"backbone": "resnet18", "backbone_weights": "random", "stages": ("layer2", "layer3"), "coreset_fraction": 0.05, "batch_size": 8},
            "preprocessing": {"image_size": 64, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c = self.config
        if len(c.stages) < 1:
            raise ScanomalyError("patchcore: needs at least one backbone stage")
        if not 0.0 < c.coreset_fraction <= 1.0:
            raise ScanomalyError(f"patchcore: coreset_fraction must be in (0, 1], got {c.coreset_fraction}")
        self.extractor = pf.build_extractor(c.backbone, c.backbone_weights, c.stages, self.device)
        self.memory: torch.Tensor | None = None  # [M, D]
        self.image_size: int | None = None

    # -- locally aware patch features -------------------------------------------------------
    def _patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] in [-1, 1] -> [B, h, w, D] patch features on the first stage's grid."""
        feats = pf.stage_features(self.extractor, x, self.device, self.precision)
        feats = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in feats]  # 3x3 neighbourhood aggregation
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return torch.cat(feats, dim=1).permute(0, 2, 3, 1)

    # -- the verbs --------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True) -> "Patchcore":
        x = as_tensor(healthy)
        pf.check_images(x)
        c = self.config
        bank, filled = None, 0
        for batch in pf.batches(x, c.batch_size, progress, "patchcore: features"):
            f = self._patch_features(batch).flatten(0, 2)  # [B * h * w, D]
            if bank is None:  # allocated once: no list of chunks and no concatenated copy
                bank = torch.empty(len(x) * f.shape[0] // len(batch), f.shape[1], device=self.device)
            bank[filled : filled + f.shape[0]] = f
            filled += f.shape[0]
        n_keep = max(1, int(math.ceil(c.coreset_fraction * bank.shape[0])))
        if n_keep < bank.shape[0]:
            keep = greedy_coreset(bank, n_keep, c.projection_dim, c.seed)
            bank = bank[keep]
        self.memory = bank.contiguous()
        self.image_size = int(x.shape[-1])
        return self

    @torch.no_grad()
    def score(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        if self.memory is None:
            raise ScanomalyError("patchcore: call fit() (or load a fitted model) before score()")
        x = as_tensor(images)
        pf.check_images(x, self.image_size)
        scores, maps = [], []
        for batch in pf.batches(x, batch_size, False, "patchcore: scoring"):
            f = self._patch_features(batch)
            n, h, w, dim = f.shape
            f = f.reshape(n, h * w, dim)
            dist, idx = nearest_neighbors(f.reshape(-1, dim), self.memory, k=1)
            patch_scores, nn_idx = dist.view(n, h * w), idx.view(n, h * w)
            scores.append(reweighted_image_score(f, patch_scores, nn_idx, self.memory, self.config.num_neighbors).cpu())
            maps.append(pf.to_anomaly_map(patch_scores.view(n, h, w), self.image_size, self.config.sigma).cpu())
        return torch.cat(scores).double().numpy(), torch.cat(maps).numpy().astype(np.float32)

    # -- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.memory is None:
            raise ScanomalyError("patchcore: nothing to save, the model is not fitted")
        state = {"memory_bank": self.memory, "image_size": torch.tensor(self.image_size, dtype=torch.int64)}
        return {**state, **pf.backbone_state(self.extractor, self.config.backbone_weights)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory = tensors["memory_bank"].float().to(self.device)
        self.image_size = int(tensors["image_size"])
        pf.load_backbone_state(self.extractor, self.config.backbone_weights, tensors)
