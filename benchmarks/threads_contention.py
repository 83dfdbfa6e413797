"""The demo under contention, with the old thread settings and the new defaults, side by side in one run.

    python benchmarks/threads_contention.py --iters 100 --out /tmp/contention

Settings:
  old  2 OpenMP threads and OpenMP's default waiting (threads spin before they sleep): what scanomaly did
       before it chose threads (OMP_WAIT_POLICY set empty, so that scanomaly does not set it and libgomp
       keeps its default; OMP_NUM_THREADS=2)
  new  scanomaly's defaults: threads from the CPU affinity and cgroup quota, OMP_WAIT_POLICY=PASSIVE
       (no OMP_* variables in the environment)

Scenarios, each for both settings:
  alone     one demo
  two       two demos at once (the time of each)
  beside    one demo beside a CPU-bound process (a Python busy loop on one core)

Prints a markdown table (wall seconds of the whole demo, its training seconds as it reports them, and the
ratio to the same setting alone) with the load average before and after each measurement, and writes
results.json to --out. On a machine that other jobs share the load column says how quiet it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "old": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": ""},
    "new": {},
}


def _env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    env.update(SETTINGS[setting])
    return env


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _start_demo(setting: str, out: Path, iters: int) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "scanomaly", "demo", "--out", str(out), "--iters", str(iters), "--device", "cpu",
           "--no-progress"]
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, env=_env(setting), stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def _finish(proc: subprocess.Popen, start: float, out: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"wall_s": None, "train_s": None, "timed_out": True}
    wall = time.perf_counter() - start
    text = out.with_suffix(".log").read_text()
    trained = re.search(r"trained (\d+) s", text)
    return {"wall_s": round(wall, 1), "train_s": int(trained.group(1)) if trained else None,
            "returncode": proc.returncode}


def measure(setting: str, scenario: str, root: Path, iters: int, timeout: float) -> list[dict]:
    before = _load()
    busy = None
    if scenario == "beside":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    n = 2 if scenario == "two" else 1
    outs = [root / f"{setting}_{scenario}_{i}" for i in range(n)]
    started = [_start_demo(setting, out, iters) for out in outs]
    results = [_finish(p, t, out, timeout) for (p, t), out in zip(started, outs)]
    if busy is not None:
        busy.kill()
        busy.wait()
    after = _load()
    return [{"setting": setting, "scenario": scenario, "run": i, "load_before": before, "load_after": after, **r}
            for i, r in enumerate(results)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default="threads_contention")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds after which one demo is stopped")
    ap.add_argument("--settings", default="old,new")
    ap.add_argument("--scenarios", default="alone,two,beside")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in args.scenarios.split(","):
        for setting in args.settings.split(","):  # old and new one after the other: the same background load
            rows += measure(setting, scenario, root, args.iters, args.timeout)
            print(json.dumps(rows[-1]), flush=True)
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")

    alone = {r["setting"]: r["wall_s"] for r in rows if r["scenario"] == "alone"}
    print(f"\ndemo --iters {args.iters}, {os.cpu_count()} CPUs; wall seconds of the whole demo (training seconds)")
    print("| setting | scenario | run | wall s | train s | × alone | load before | load after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = alone.get(r["setting"])
        ratio = f"{r['wall_s'] / base:.2f}" if r["wall_s"] and base else "-"
        wall = "timed out" if r.get("timed_out") else r["wall_s"]
        print(f"| {r['setting']} | {r['scenario']} | {r['run']} | {wall} | {r['train_s']} | {ratio} "
              f"| {r['load_before']} | {r['load_after']} |")


if __name__ == "__main__":
    main()
