"""How many threads the heavy verbs use, and how they wait: fair on machines that other jobs share.

- **How many.** `--threads N` on `train`, `score`, `export`, `demo`, `benchmark` and `report`; by default
  the `OMP_NUM_THREADS` of the environment when set, else the cores this process may use: its CPU
  affinity (`taskset`, a container's cpuset), capped by its cgroup CPU quota (`docker --cpus`,
  Kubernetes limits), rounded down, at least 1. Not the machine's core count: a container limited to
  2 CPUs on a 64-core host gets 2 threads.
- **How they wait.** OpenMP threads that finish their share of a parallel region early wait for the
  others. Spinning there burns a core another job could use, and when a core is taken a spinning team
  waits on its slowest, descheduled member. `OMP_WAIT_POLICY=PASSIVE` (threads sleep while waiting) is
  set when scanomaly is imported, unless the environment sets it: OpenMP reads it once, when it starts,
  which is when torch is imported; so `import scanomaly` must come before `import torch` for it to apply
  (the `scanomaly` command always does so).
- **Data loading.** DataLoader worker processes (image decoding for `score`) each run one thread; by
  default there are `min(2, cores - 1)` of them, so that the model's threads and the readers together
  do not ask for more cores than the process may use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_DEFAULT_WORKERS = 2


def set_wait_policy(environ=os.environ) -> None:
    """OpenMP threads sleep instead of spinning while they wait (unless the environment says otherwise).
    Must run before torch is imported (it is, by `scanomaly/__init__.py`)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup folders of this process (v2 unified and v1 cpu controller), most specific first, then root."""
    dirs = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            dirs.append(root / rel)
        elif "cpu" in controllers.split(","):
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                dirs.append(root / name / rel)
    dirs += [root, root / "cpu", root / "cpu,cpuacct"]
    return dirs


def cgroup_cpu_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the cgroup quota allows (e.g. 1.5), or None when unlimited or unknown.
    cgroup v2: `cpu.max` ("max 100000" or "150000 100000"); v1: cpu.cfs_quota_us / cpu.cfs_period_us."""
    root = Path(root)
    for d in _own_cgroup_dirs(root, Path(proc_cgroup)):
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota == "max":
                return None
            try:
                return int(quota) / int(period or 100000)
            except ValueError:
                return None
        quota_text, period_text = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota_text is not None and period_text is not None:
            try:
                quota, period = int(quota_text), int(period_text)
            except ValueError:
                return None
            return None if quota <= 0 or period <= 0 else quota / period
    return None


def affinity_cpus() -> int:
    """Cores this process may run on (its CPU affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_cpus(affinity: int | None = None, quota: float | None | str = "read") -> int:
    """The cores this process may use: the affinity mask, capped by the cgroup quota (rounded down), at least 1."""
    n = affinity_cpus() if affinity is None else affinity
    limit = cgroup_cpu_limit() if quota == "read" else quota
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def default_threads(environ=os.environ, **kwargs) -> int:
    """OMP_NUM_THREADS when the environment sets it (to a positive integer), else `available_cpus()`."""
    text = (environ.get("OMP_NUM_THREADS") or "").split(",")[0].strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return available_cpus(**kwargs)


def default_workers(**kwargs) -> int:
    """DataLoader reader processes beside the model's threads: min(2, cores - 1)."""
    return max(0, min(MAX_DEFAULT_WORKERS, available_cpus(**kwargs) - 1))


def check_threads(threads) -> None:
    from .errors import ScanomalyError

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ScanomalyError(f"--threads must be a positive integer, got {threads!r}")


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (default: `default_threads()`); returns the number used."""
    import torch

    check_threads(threads)
    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
