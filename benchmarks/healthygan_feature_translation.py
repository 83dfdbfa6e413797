"""HealthyGAN translating frozen ImageNet feature maps instead of pixels: a design probe, VALIDATION only.

    python benchmarks/healthygan_feature_translation.py DATA [--residual] [--steps 200] [--a-equals-b]
        [--critic-stride 1] [--patchcore] [--intensity percentile] [--out result.json]

Same split as `scanomaly train --from-labeled DATA` (HealthyGAN protocol, seed 0), 128 px, one channel.
1. Every scan of B, A (each also flipped), the AUCp hold-out and the validation split goes once through frozen
   EfficientNet-Lite0 (stage3 + stage5 upsampled to stage3's 16 x 16 grid, 3 x 3 local average: PatchCore's
   patch features), standardised per channel with B's statistics: z.
2. A generator on z gives (T, M), healthy(z) = M*T + (1 - M)*z (with --residual, T = z + delta, delta
   starting at 0, so that the identity is free); a WGAN-GP critic on feature maps, real = B.
3. HealthyGAN's losses, imported from the method: adversarial, identity on B, reconstruction on A, mask.
4. Every --eval-every steps, on validation: AUROC of what had to change (mean / max of the per-position
   squared change, upsampled and blurred), of the critic's own verdict (-D(z), mean over its patch map),
   on lgg_flair the pixel AUROC of both maps inside the head, and AUCp (label-free).
With --a-equals-b the unlabeled set is B itself (HealthyGAN without its mixed set).
With --patchcore, PatchCore's cpu profile fitted on B is scored on the same validation images.
No test image is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scanomaly import localization as loc
from scanomaly.data import discover, load_images
from scanomaly.methods import _patch_features as pf
from scanomaly.nn.blocks import gradient_penalty
from scanomaly.methods.healthygan import identity_loss, mask_loss, reconstruction_loss
from scanomaly.preprocess import Preprocessing
from scanomaly.splits import make_healthygan_split

p = argparse.ArgumentParser()
p.add_argument("data")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--width", type=int, default=64)
p.add_argument("--blocks", type=int, default=3)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--n-critic", type=int, default=2)
p.add_argument("--lid", type=float, default=1.0)
p.add_argument("--lrec", type=float, default=1.0)
p.add_argument("--lmask", type=float, default=0.1)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--stages", default="stage3,stage5")
p.add_argument("--a-equals-b", action="store_true")
p.add_argument("--intensity", default="none")
p.add_argument("--residual", action="store_true")
p.add_argument("--critic-stride", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--patchcore", action="store_true")
p.add_argument("--out", default=None)
args = p.parse_args()
torch.manual_seed(args.seed)
t_start = time.time()

# split and images (128 px, one channel: PatchCore's cpu geometry)
split = make_healthygan_split(discover(args.data), seed=0)
prep = Preprocessing(image_size=128, channels=1, intensity=args.intensity)
B = load_images(split.healthy, prep, progress=False)
A = load_images([r for r in split.unlabeled], prep, progress=False)
H = load_images(split.healthy_holdout, prep, progress=False)
V = load_images(split.val, prep, progress=False)
if args.a_equals_b:
    A = B
print(f"B {len(B)} A {len(A)} hold {len(H)} val {len(V)} (val abnormal {int(V.labels.sum())}) load {time.time()-t_start:.0f}s", flush=True)

# 1. frozen features: stages upsampled to the first stage's grid, concatenated, 3x3 local average (PatchCore)
ext = pf.build_extractor("efficientnet_lite0", "imagenet", args.stages.split(","), torch.device("cpu"))


@torch.no_grad()
def feats(x):
    out = []
    for i in range(0, len(x), 64):
        fs = ext(ext.prepare(x[i:i + 64]))
        size = fs[0].shape[-2:]
        z = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in fs], 1)
        out.append(F.avg_pool2d(z, 3, 1, 1))
    return torch.cat(out)


zb = feats(B.images)
zb = torch.cat([zb, feats(B.images.flip(-1))])
za = feats(A.images)
za = torch.cat([za, feats(A.images.flip(-1))])
zh, zv = feats(H.images), feats(V.images)
mu, sd = zb.mean((0, 2, 3), keepdim=True), zb.std((0, 2, 3), keepdim=True) + 1e-3
norm = lambda z: (z - mu) / sd  # noqa: E731
zb, za, zh, zv = map(norm, (zb, za, zh, zv))
C = zb.shape[1]
print(f"features {tuple(zb.shape)} at {time.time()-t_start:.0f}s", flush=True)


# 2. networks on feature maps
class Res(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.b = nn.Sequential(nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.InstanceNorm2d(w, affine=True), nn.ReLU(True),
                               nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.InstanceNorm2d(w, affine=True))

    def forward(self, x):
        return x + self.b(x)


class Gen(nn.Module):
    def __init__(self, C, w, blocks):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(C, w, 1, bias=False), nn.InstanceNorm2d(w, affine=True), nn.ReLU(True),
                                 *[Res(w) for _ in range(blocks)], nn.Conv2d(w, C + 1, 1))
        if args.residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):
        o = self.net(z)
        T, M = o[:, :-1], torch.sigmoid(2 * o[:, -1:])  # (tanh + 1) / 2
        if args.residual:
            T = z + T
        return M * T + (1 - M) * z, T, M


class Critic(nn.Module):
    def __init__(self, C, w):
        super().__init__()
        k, st = (4, 2) if args.critic_stride == 2 else (3, 1)  # a 4 x 4 patch map, or one verdict per position
        self.net = nn.Sequential(nn.Conv2d(C, w, 3, 1, 1), nn.LeakyReLU(0.01),
                                 nn.Conv2d(w, 2 * w, k, st, 1), nn.LeakyReLU(0.01),
                                 nn.Conv2d(2 * w, 4 * w, k, st, 1), nn.LeakyReLU(0.01), nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, z):
        return self.net(z)


G, D = Gen(C, args.width, args.blocks), Critic(C, args.width)
G_ema = Gen(C, args.width, args.blocks)
G_ema.load_state_dict(G.state_dict())
og = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
od = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))


@torch.no_grad()
def score(g, z, pool="mean"):
    out = []
    for i in range(0, len(z), 128):
        h, T, M = g(z[i:i + 128])
        d = (z[i:i + 128] - h).pow(2).mean(1)
        out.append(pf.to_anomaly_map(d, 128, 4.0))
    maps = torch.cat(out)
    s = maps.flatten(1).mean(1) if pool == "mean" else maps.flatten(1).amax(1)
    return s.numpy(), maps.numpy()


# AUCp pool: held-out healthy vs a seeded slice of A kept out of training
perm = torch.randperm(len(A), generator=torch.Generator().manual_seed(1))
n_pool = min(256, max(1, len(A) // 10))
pool_idx = perm[:n_pool]
train_a = torch.ones(len(za), dtype=torch.bool)
if not args.a_equals_b:
    train_a[pool_idx] = False
    train_a[pool_idx + len(A)] = False
za_train, za_pool = za[train_a], za[pool_idx]
yv = V.labels
fg = loc.foreground_mask(V.images.numpy()) if V.masks is not None else None


def val_report(g):
    r = {}
    for pool in ("mean", "max"):
        s, maps = score(g, zv, pool)
        r[f"val_{pool}"] = roc_auc_score(yv, s)
    if V.masks is not None and V.masks.any():
        r["val_pixel"] = loc.pixel_auroc(maps, V.masks.numpy().astype(bool), region=fg)
    with torch.no_grad():
        crit = -torch.cat([D(zv[i:i + 128]).flatten(1).mean(1) for i in range(0, len(zv), 128)]).numpy()
    r["val_critic"] = roc_auc_score(yv, crit)
    if V.masks is not None and V.masks.any():
        with torch.no_grad():
            cm = -torch.cat([D(zv[i:i + 128])[:, 0] for i in range(0, len(zv), 128)])
        cm = pf.to_anomaly_map(cm, 128, 4.0).numpy()
        r["val_critic_pixel"] = loc.pixel_auroc(cm, V.masks.numpy().astype(bool), region=fg)
    s0, _ = score(g, zh)
    s1, _ = score(g, za_pool)
    r["aucp"] = roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0, s1])
    return r


hist = []
r = val_report(G_ema)
r["step"] = 0
hist.append(r)
print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
gen = torch.Generator().manual_seed(args.seed)
t0 = time.time()
for step in range(1, args.steps + 1):
    frac = step / args.steps
    lr = args.lr * min(1.0, (1 - frac) / 0.25)  # linear decay over the last quarter
    for o in (og, od):
        for pg in o.param_groups:
            pg["lr"] = lr
    a = za_train[torch.randint(len(za_train), (args.batch,), generator=gen)]
    b = zb[torch.randint(len(zb), (args.batch,), generator=gen)]
    with torch.no_grad():
        fake = G(a)[0]
    ld = -D(b).mean() + D(fake).mean() + 10 * gradient_penalty(D, b, fake)
    od.zero_grad()
    ld.backward()
    od.step()
    if step % args.n_critic == 0:
        ha, ta, ma = G(a)
        hb, tb, mb = G(b)
        adv = -D(ha).mean() - D(hb).mean()
        idt = identity_loss(b, tb)
        rec = reconstruction_loss(a, ta, ma)
        msk = (mask_loss(ma) + mask_loss(mb)) / 2
        lg = adv + args.lid * idt + args.lrec * rec + args.lmask * msk
        og.zero_grad()
        lg.backward()
        og.step()
        with torch.no_grad():
            for pe, pg_ in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(pg_, 1 - 0.999)
            for be, bg in zip(G_ema.buffers(), G.buffers()):
                be.copy_(bg)
    if step % args.eval_every == 0:
        r = val_report(G_ema)
        r.update(step=step, sec=round(time.time() - t0, 1), m_a=round(ma.mean().item(), 3), idt=round(idt.item(), 3),
                 w=round((D(b).mean() - D(fake).mean()).item(), 3))
        hist.append(r)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)

best = max(hist[1:], key=lambda r: r["aucp"]) if len(hist) > 1 else hist[0]
summary = {"data": Path(args.data).name, "args": vars(args), "untrained": hist[0], "aucp_pick": best, "last": hist[-1],
           "it_per_s": args.steps / (time.time() - t0)}
if args.patchcore:
    from scanomaly.methods.patchcore import Patchcore
    pc = Patchcore.from_profile("cpu", {}, {"intensity": args.intensity})
    pc.fit(B, progress=False)
    s, maps = pc.score(V)
    summary["patchcore_val"] = roc_auc_score(yv, s)
    if V.masks is not None and V.masks.any():
        summary["patchcore_pixel"] = loc.pixel_auroc(maps, V.masks.numpy().astype(bool), region=fg)
print("SUMMARY", json.dumps(summary, default=str), flush=True)
if args.out:
    Path(args.out).write_text(json.dumps(summary, default=str, indent=1))
