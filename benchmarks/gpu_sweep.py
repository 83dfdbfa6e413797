"""HealthyGAN on a lent GPU: training speed, and cpu-profile variants judged on validation data only.

A GPU trains the 64 px cpu profile in a minute or two, so variants of it can be compared there in
numbers a 2-core CPU would need days for. Only the chosen variant is then benchmarked on the CPU
(`run_method.py`), where the profile has to run. The test split is never packed: nothing on the
GPU machine can see it.

    # here: the seed-0 split's B, held-out healthy, A and validation images, prepared as the cpu profile prepares them
    python benchmarks/gpu_sweep.py pack --out .gpudata/chest64.npz
    # on the GPU machine (carry .gpudata): variants x seeds, several processes sharing the GPU
    python benchmarks/gpu_sweep.py sweep .gpudata/chest64.npz --variants base lr5e-4 --seeds 0 1 --out $OUT/sweep.jsonl
    # training speed of a profile on synthetic images (no data needed)
    python benchmarks/gpu_sweep.py speed --profile paper --precision bf16 --iters 60

`sweep` writes one JSON line per finished run: AUCp and validation AUROC at every checkpoint, the
AUCp-chosen step and the validation AUROC there, seconds and iterations per second.
"""

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Cost-matched variants of the cpu profile: each trains in about the profile's CPU time (~28 min on
# 2 cores; a critic step costs ~0.30 s, a generator step ~0.57 s at batch 16), so any of them could
# become the profile. Keys are HealthyGANConfig fields.
VARIANTS = {
    "base": {},
    "lr2e-4": {"lr": 2e-4},
    "lr5e-4": {"lr": 5e-4},
    "betas0.9": {"betas": (0.0, 0.9)},  # the WGAN-GP paper's Adam betas
    "decay0.5": {"lr_decay_fraction": 0.5},
    "decay0": {"lr_decay_fraction": 0.0},
    "ema0.9995": {"ema_decay": 0.9995},
    "ema0.998": {"ema_decay": 0.998},
    "batch32": {"batch_size": 32, "iterations": 1400, "checkpoint_every": 125},
    "batch8": {"batch_size": 8, "iterations": 5000, "checkpoint_every": 500},
    "ncritic1": {"n_critic": 1, "iterations": 1900},  # a generator step every iteration, same CPU time
    "mask0.2": {"lambda_mask": 0.2},
    "mask0.05": {"lambda_mask": 0.05},
    "id1": {"lambda_id": 1.0},  # the paper's identity weight
    "rec5": {"lambda_rec": 5.0},
    "noflip": {"hflip": False},
    "blocks3": {"residual_blocks": 3, "iterations": 3400},  # a cheaper generator, more iterations
}


# ---------------------------------------------------------------------------------------------
def pack(args) -> None:
    from scanomaly.data import discover, load_images
    from scanomaly.methods.healthygan import HealthyGAN
    from scanomaly.splits import make_healthygan_split

    prep = HealthyGAN.from_profile("cpu").preprocessing
    split = make_healthygan_split(discover(args.data), abnormal_fraction=0.3, seed=args.split_seed)
    sets = {"b": split.healthy, "holdout": split.healthy_holdout, "a": split.unlabeled, "val": split.val}
    out = {}
    for key, records in sets.items():
        images = load_images(records, prep, progress=True, desc=key)
        # 8 bits per pixel: the [-1, 1] tensors to 1/255 steps, 4x smaller than float32
        out[key] = np.round((images.images.numpy() + 1) * 127.5).astype(np.uint8)
        if key == "val":
            out["val_labels"] = images.labels.astype(np.int8)
    out["preprocessing"] = np.array(json.dumps(prep.to_dict()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print({k: v.shape for k, v in out.items()})


def _unpack(path):
    data = np.load(path)
    as_x = lambda key: torch.from_numpy(data[key].astype(np.float32) / 127.5 - 1)  # noqa: E731
    return as_x("b"), as_x("holdout"), as_x("a"), as_x("val"), data["val_labels"]


def train_one(job) -> dict:
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    from scanomaly.methods.healthygan import HealthyGAN

    data_path, variant, seed, device, precision, extra = job
    torch.set_num_threads(1)
    b, holdout, a, val, val_labels = _unpack(data_path)
    overrides = {**VARIANTS[variant], **extra, "seed": seed, "keep_snapshots": True}
    det = HealthyGAN.from_profile("cpu", overrides, device=device, precision=precision)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        det.fit(b, a, holdout=holdout, work_dir=Path(work), progress=False)
        seconds = time.perf_counter() - t0
        chosen = det.extra_state()
        aucp = {h["step"]: h["metric"] for h in chosen["aucp_history"]}
        history = []
        for snap in sorted(Path(work, "snapshots").glob("step_*.safetensors")):
            step = int(snap.stem.split("_")[1])
            det.load_state_tensors(load_file(str(snap)))
            scores, _ = det.score(val)
            history.append({"step": step, "aucp": aucp.get(step), "val_auroc": float(roc_auc_score(val_labels, scores))})
    by_step = {h["step"]: h["val_auroc"] for h in history}
    return {
        "variant": variant, "overrides": {**VARIANTS[variant], **extra}, "seed": seed,
        "precision": precision, "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "selected_step": chosen["selected_step"], "val_at_selected": by_step.get(chosen["selected_step"]),
        "val_last": history[-1]["val_auroc"] if history else None, "val_best": max(by_step.values(), default=None),
        "seconds": seconds, "iterations_per_second": det.train_result.iterations_per_second, "history": history,
    }


def sweep(args) -> None:
    from scanomaly.options import parse_value

    extra = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    jobs = [(args.data, v, s, args.device, args.precision, extra) for v in args.variants for s in args.seeds]
    unknown = sorted({v for v in args.variants if v not in VARIANTS})
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    out = Path(args.out)
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    with ctx.Pool(args.processes) as pool, out.open("a") as f:
        for r in pool.imap_unordered(train_one, jobs):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['variant']:>10} s{r['seed']}: AUCp picks {r['selected_step']}, val there {r['val_at_selected']:.3f}, "
                  f"best {r['val_best']:.3f}, last {r['val_last']:.3f}; {r['seconds']:.0f} s "
                  f"({r['iterations_per_second']:.1f} it/s)", flush=True)


def speed(args) -> None:
    """Iterations per second of one profile on synthetic images (the image content does not change the cost)."""
    from scanomaly.methods.healthygan import HealthyGAN

    det = HealthyGAN.from_profile(args.profile, {"iterations": args.iters, "selection": "last", "checkpoint_every": 10**9,
                                                 "sample_every": 10**9}, device=args.device, precision=args.precision)
    p = det.preprocessing
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, p.channels, p.image_size, p.image_size, generator=g) * 2 - 1
    det.fit(x[:32], x[32:], progress=False)
    r = det.train_result
    print(json.dumps({"profile": args.profile, "image_size": p.image_size, "channels": p.channels,
                      "width": det.config.width, "batch_size": det.config.batch_size, "precision": args.precision,
                      "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                      "iterations": r.steps, "seconds": round(r.seconds, 2),
                      "iterations_per_second": round(r.iterations_per_second, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", default="../shared/data/chest_xray_pneumonia")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=".gpudata/chest64.npz")
    p = sub.add_parser("sweep")
    p.add_argument("data")
    p.add_argument("--variants", nargs="+", default=["base"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="32")
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides on top of every variant (smoke runs)")
    p = sub.add_parser("speed")
    p.add_argument("--profile", default="paper")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="32")
    args = ap.parse_args()
    {"pack": pack, "sweep": sweep, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
