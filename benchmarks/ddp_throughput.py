"""Training speed of HealthyGAN's cpu profile with 1 and 2 CPU processes (torchrun, gloo).

    python benchmarks/ddp_throughput.py --iterations 60 --cores 2

Each configuration uses all `--cores`: 1 process with `cores` threads, 2 processes with cores/2
threads each. The global batch is the profile's (16) in both. Synthetic 64 px images: the speed of
a training step does not depend on what the pixels show. Prints a markdown table of iterations/s
(measured by the loop after a 10-iteration warm-up run in the same process).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch

    from scanomaly import distributed
    from scanomaly.methods.healthygan import HealthyGAN

    world = distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    x_b = torch.rand(256, 1, 64, 64, generator=g) * 2 - 1
    x_a = torch.rand(256, 1, 64, 64, generator=g) * 2 - 1
    overrides = {"selection": "last", "checkpoint_every": 10**9, "sample_every": 10**9}
    HealthyGAN.from_profile("cpu", {**overrides, "iterations": 10}).fit(x_b, x_a, progress=False)  # warm-up
    det = HealthyGAN.from_profile("cpu", {**overrides, "iterations": args.iterations})
    det.fit(x_b, x_a, progress=False)
    if world.is_main:
        Path(args.result).write_text(json.dumps({"iterations_per_second": det.train_result.iterations_per_second}))
    distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for nproc in (1, 2):
        threads = max(1, args.cores // nproc)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                            __file__, "--worker", "--iterations", str(args.iterations), "--result", str(result)],
                           env=env, check=True)
            wall = time.perf_counter() - t0
            its = json.loads(result.read_text())["iterations_per_second"]
        rows.append((nproc, threads, its, wall))
    print("| processes | threads each | iterations/s | wall s (incl. start-up, warm-up) |")
    print("|---|---|---|---|")
    for nproc, threads, its, wall in rows:
        print(f"| {nproc} | {threads} | {its:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
