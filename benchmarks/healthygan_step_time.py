"""HealthyGAN: training iterations per second of generator variants at the same profile, measured
in alternation (A, B, A, B, ...) so that a shared machine's changing load hits all of them alike.

    OMP_NUM_THREADS=1 python benchmarks/healthygan_step_time.py --profile cpu --iters 20 --rounds 2 \\
        --variant stargan: --variant lite0:generator=lite0

Each variant is `NAME:KEY=VALUE,KEY=VALUE` (config overrides). Random 64 px images stand in for
scans (the cost of a step does not depend on the pixels). Prints iterations per second per round and
the median, and the scoring images per second of each variant's scoring network.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

from scanomaly.methods.healthygan import HealthyGAN


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    cfg = {}
    for pair in filter(None, re.split(r",(?=\w+=)", rest)):  # a comma inside a value (stages=a,b) stays
        key, _, value = pair.partition("=")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    return name, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", required=True)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    size = HealthyGAN.from_profile(args.profile).preprocessing.image_size
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(256, 1, size, size, generator=g) * 2 - 1 for _ in range(2))
    rates: dict[str, list[float]] = {name: [] for name, _ in variants}
    scoring: dict[str, float] = {}
    for r in range(args.rounds):
        for name, cfg in variants:
            det = HealthyGAN.from_profile(args.profile, {**cfg, "iterations": args.iters, "selection": "last", "ema_decay": 0.0})
            t = time.perf_counter()
            det.fit(b, a, progress=False)
            rates[name].append(args.iters / (time.perf_counter() - t))
            if r == 0:
                t = time.perf_counter()
                det.score(a, batch_size=64)
                scoring[name] = len(a) / (time.perf_counter() - t)
            print(f"round {r}: {name}: {rates[name][-1]:.3f} it/s", flush=True)
    for name, _ in variants:
        print(f"{name}: median {statistics.median(rates[name]):.3f} it/s over {args.rounds} round(s) of {args.iters}; "
              f"scoring {scoring[name]:.0f} images/s")


if __name__ == "__main__":
    main()
