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
The coreset keeps 10%: the paper reports 25%, 10% and 1% as almost equally good on MVTec (and
uses 1% for its 1536-d, 224-px banks); chest X-rays vary more between healthy patients than
MVTec's objects do, so the cpu profile keeps the safer 10%, still 10x less to search at test time.

The greedy selection gives exactly the textbook result but is organised for a CPU (see
`greedy_coreset`): a short list of the farthest points is refreshed after every pick and the whole
bank only every few hundred picks, in one matrix product. At 10% of ~1.5e5 patches this takes about
as long as extracting the features, instead of several times longer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..detector import Detector, as_tensor, register
from ..errors import ScanomalyError
from . import _patch_features as pf

FLUSH_ROWS = 16384  # points per matrix product when the coreset distances are brought up to date
DISTANCE_BLOCK = 1 << 23  # entries of one query x memory distance block (32 MiB in float32)


# per backbone: the last block at strides 8 and 16 (the paper's layer2 + layer3)
BACKBONE_STAGES = {
    "resnet18": ("layer2", "layer3"),
    "wide_resnet50_2": ("layer2", "layer3"),
    "efficientnet_lite0": ("stage3", "stage5"),
}


@dataclass
class PatchcoreConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = "imagenet"  # "imagenet", a local weights file, or "random"
    stages: tuple[str, ...] = ()  # empty: BACKBONE_STAGES for the backbone
    coreset_fraction: float = 0.1  # share of the training patches kept in the memory bank (paper: 0.01)
    projection_dim: int = 128  # sparse random projection used for the coreset distances (paper: 128)
    num_neighbors: int = 9  # b of the image-score re-weighting
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the input
    seed: int = 0  # coreset start point and random projection
    batch_size: int = 32  # images per backbone pass during fit


# ------------------------------------------------------------------------------------------
# coreset subsampling
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cpu_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sparse_random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """[dim_in, dim_out] "very sparse" random projection (Li, Hastie & Church 2006): entries are
    +-sqrt(1 / (density * dim_out)) with probability density / 2 each and 0 otherwise, density = 1 / sqrt(dim_in)."""
    density = 1.0 / math.sqrt(dim_in)
    u = torch.rand(dim_in, dim_out, generator=generator)
    signs = torch.where(u < density / 2, -1.0, torch.where(u < density, 1.0, 0.0))
    return signs * math.sqrt(1.0 / (density * dim_out))


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    top_size: int = 2048,
    max_pending: int = 256,
) -> torch.Tensor:
    """Indices [n_select] of a greedy k-center coreset of `features` [N, D], in the order chosen.

    Step t adds argmax_x min_{c chosen} ||x - c|| (on the projected features when D > projection_dim),
    starting from a random point. The result is exactly that of the textbook loop, which updates all N
    distances with a matrix-vector product after every pick, but the work is arranged for a CPU:

    - only the `top_size` points with the largest distances are updated after every pick;
      everyone else's distance is a stale upper bound, never above `tau`, the largest one left out;
    - while the best refreshed point of that list is >= tau it is the true farthest point;
    - otherwise, or once `max_pending` picks have accumulated, all N distances are brought up to
      date in one matrix product with the pending centres (compute-bound instead of memory-bound)
      and the list is rebuilt.

    The per-pick steps are tiny, so on the CPU they run on one thread (thread hand-offs cost more
    than they save, and far more on a busy machine); only the batched updates use all threads.
    """
    n = features.shape[0]
    n_select = max(1, min(int(n_select), n))
    gen = torch.Generator().manual_seed(seed)
    z = features.float()
    if projection_dim and z.shape[1] > projection_dim:
        proj = sparse_random_projection(z.shape[1], projection_dim, gen).to(z.device)
        z = torch.cat([z[s : s + 65536] @ proj for s in range(0, n, 65536)])
    z = z - z.mean(0)  # same distances; smaller numbers in ||x||^2 - 2 x.c + ||c||^2
    sq = (z * z).sum(1)
    first = int(torch.randint(n, (1,), generator=gen))
    if n_select == 1:
        return torch.tensor([first], device=z.device)

    chosen = torch.empty(n_select, dtype=torch.long, device=z.device)
    centers = torch.empty(n_select, z.shape[1], dtype=z.dtype, device=z.device)
    centers_sq = torch.empty(n_select, dtype=z.dtype, device=z.device)
    chosen[0], centers[0], centers_sq[0] = first, z[first], sq[first]
    # squared distance of every point to its nearest centre among centers[:applied]
    dist2 = (sq - 2 * torch.mv(z, centers[0]) + centers_sq[0]).clamp_min(0)
    applied = 1
    top_size = max(1, min(top_size, n - 1))

    def top_list():  # the top_size farthest points, and tau: an upper bound for all the others
        values, idx = torch.topk(dist2, top_size + 1)
        idx = idx[:top_size]
        return idx, values[:top_size].clone(), float(values[top_size]), z[idx], sq[idx]

    threads = torch.get_num_threads()
    with _cpu_threads(1):
        top_idx, top_dist2, tau, top_z, top_sq = top_list()
        for t in range(1, n_select):
            j = int(torch.argmax(top_dist2))
            if float(top_dist2[j]) < tau or t - applied >= max_pending:
                # apply the pending centres to every point, block by block
                pending, pending_sq = centers[applied:t].t(), centers_sq[applied:t].unsqueeze(0)
                with _cpu_threads(threads):
                    for s in range(0, n, FLUSH_ROWS):
                        e = s + FLUSH_ROWS
                        d2 = torch.addmm(pending_sq, z[s:e], pending, alpha=-2.0).amin(1) + sq[s:e]
                        torch.minimum(dist2[s:e], d2, out=dist2[s:e])
                applied = t
                top_idx, top_dist2, tau, top_z, top_sq = top_list()
                j = int(torch.argmax(top_dist2))
            i = top_idx[j]
            chosen[t], centers[t], centers_sq[t] = i, z[i], sq[i]
            torch.minimum(top_dist2, top_sq - 2 * torch.mv(top_z, centers[t]) + centers_sq[t], out=top_dist2)
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
        idx.append(d2.argmin(1, keepdim=True) if k == 1 else torch.topk(d2, k, dim=1, largest=False).indices)
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
    not_exportable_because = (
        "its score is a nearest-neighbour search in a memory bank of healthy patch features, "
        "not one trained network; score it with PyTorch"
    )
    Config = PatchcoreConfig
    profiles = {
        "cpu": {
            "config": {
                "backbone": "efficientnet_lite0",
                "backbone_weights": "imagenet",  # shipped in the optional package (scanomaly[pretrained])
                "stages": ("stage3", "stage5"),
                "coreset_fraction": 0.1,
            },
            "preprocessing": {"image_size": 128, "channels": 1},
        },
        "paper": {
            "config": {
                "backbone": "wide_resnet50_2",
                # torchvision's ImageNet file is not bundled: set backbone_weights=/path/to/wide_resnet50_2-95faca4d.pth
                "backbone_weights": "imagenet",
                "stages": ("layer2", "layer3"),
                "coreset_fraction": 0.01,
            },
            "preprocessing": {"image_size": 224, "channels": 1},
        },
        "tiny": {  # random weights: fast tests that need no extra package
            "config": {
                "backbone": "resnet18",
                "backbone_weights": "random",
                "stages": ("layer2", "layer3"),
                "coreset_fraction": 0.05,
                "batch_size": 8,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c = self.config
        if not 0.0 < c.coreset_fraction <= 1.0:
            raise ScanomalyError(f"patchcore: coreset_fraction must be in (0, 1], got {c.coreset_fraction}")
        stages = c.stages or BACKBONE_STAGES.get(c.backbone, ())
        self.extractor = pf.build_extractor(c.backbone, c.backbone_weights, stages, self.device)
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
