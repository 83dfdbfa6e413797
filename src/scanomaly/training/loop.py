"""The one GAN training loop every method in scanomaly uses.

A method describes itself as a `GANTask`: its modules, its optimizers, and its *phases*: each phase
is one loss, minimised by one optimizer over some modules, every `every` iterations (WGAN's
n_critic is a critic phase every iteration and a generator phase every 2nd or 5th). The loop
does everything else, once for all methods:

- batches from in-memory tensors, reshuffled each epoch by a seeded generator, optional flips;
- data-parallel training on several processes (torchrun; see `scanomaly.distributed`): each phase's
  networks are wrapped in DistributedDataParallel, each rank trains on its slice of the global batch,
  rank 0 writes checkpoints, logs and samples, every rank resumes from the same checkpoint;
- mixed precision (bf16 autocast; fp16 with a GradScaler on CUDA);
- a learning rate that decays linearly to 0 over the last part of training;
- an exponential moving average of chosen modules (used for scoring);
- checkpoints every N iterations and at the end, written atomically, holding model, optimizer,
  EMA, RNG and data-order state, so a killed run resumes exactly where it stopped;
- a progress bar with the current losses, a CSV loss log, periodic sample grids;
- a guard that stops on NaN/inf losses with a clear message and keeps the last good checkpoint;
- an optional label-free evaluation at each checkpoint (HealthyGAN's AUCp) that keeps the best
  weights.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import distributed
from ..errors import ScanomalyError, TrainingDiverged
from ..nn.blocks import EMA
from ..runs import write_weights

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"  # the scoring weights of the best-evaluated checkpoint


@dataclass
class Phase:
    """One optimisation step: minimise `loss(batch)` with `optimizer` every `every` iterations."""

    name: str
    optimizer: str  # key into GANTask.optimizers()
    modules: tuple[str, ...]  # modules this phase trains (others are frozen during it)
    every: int = 1


@dataclass
class LoopConfig:
    """The loop's settings. Every GAN method's Config extends this class, so they are options of the method
    like any other (`--set iterations=500`), with the method's own defaults where it redeclares them, and
    the loop reads them from the config itself."""

    iterations: int = 10_000
    batch_size: int = 16  # the global batch: split evenly over the processes of a distributed run
    seed: int = 0
    lr_decay_fraction: float = 0.25  # decay linearly to 0 over this last fraction of iterations
    ema_decay: float = 0.999  # EMA of the task's `ema_modules` (which then score); 0: the raw networks score
    hflip: bool = True
    checkpoint_every: int = 500
    sample_every: int = 500
    keep_snapshots: bool = False  # also keep the scoring weights of every checkpoint (for analysis: benchmarks/)

    # options that earlier versions had, with the value that what the code does now equals: a saved model.json
    # that holds one at that value still loads; any other value is refused (detector.config_from_dict)
    retired_options: ClassVar[dict] = {"frame_jitter": 0.0}


LOG_EVERY = 25  # iterations per row of losses.csv (means over the window) and per progress-bar update


class GANTask(abc.ABC):
    """What a GAN method gives the loop."""

    #: modules whose EMA copy is kept (used for scoring); e.g. ("generator",)
    ema_modules: tuple[str, ...] = ()

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]: ...

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    @abc.abstractmethod
    def phases(self) -> list[Phase]: ...

    @abc.abstractmethod
    def loss(self, phase: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of `phase` on `batch`, and the numbers to log."""

    def after_step(self, phase: str, logs: dict[str, float]) -> None:
        """Hook after a phase's optimizer step (GANomaly re-initialises a collapsed discriminator here)."""

    def sample_rows(
        self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]
    ) -> list[tuple[str, torch.Tensor]]:
        """Rows of a sample grid for a fixed batch (e.g. input | healthy | mask | difference), drawn
        with `nets`: the networks that score, i.e. the EMA copy where the task keeps one (so the grid
        shows what the detector will do), the live network otherwise; all in eval mode."""
        return []


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class BatchStream:
    """Endless batches from in-memory tensors: one seeded permutation per epoch per set.

    Its whole state is (epoch, position) per set plus one generator state, so it can be saved in a
    checkpoint and resumed to give exactly the same batches.

    In a distributed run every rank draws the same global batch (same seed, same draws) and keeps
    its own contiguous slice: the sharding DistributedSampler does, at batch rather than epoch
    granularity, so that a run can resume in the middle of an epoch.
    """

    def __init__(self, sets: dict[str, torch.Tensor], batch_size: int, seed: int, hflip: bool,
                 world: distributed.World = distributed.World(), pin_memory: bool = False):
        for name, t in sets.items():
            if len(t) == 0:
                raise ScanomalyError(f"training set {name!r} has no images")
        self.sets, self.batch_size, self.hflip = sets, batch_size, hflip
        self.shard = world.shard(batch_size)
        self.pin_memory = pin_memory  # page-locked batches copy to a GPU asynchronously
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = {k: 0 for k in sets}
        self.pos = {k: 0 for k in sets}
        self.perm = {k: torch.randperm(len(t), generator=self.generator) for k, t in sets.items()}

    def next(self) -> dict[str, torch.Tensor]:
        batch = {}
        for name, data in self.sets.items():
            idx = []
            while len(idx) < self.batch_size:
                if self.pos[name] >= len(data):
                    self.epoch[name] += 1
                    self.pos[name] = 0
                    self.perm[name] = torch.randperm(len(data), generator=self.generator)
                take = min(self.batch_size - len(idx), len(data) - self.pos[name])
                idx.extend(self.perm[name][self.pos[name] : self.pos[name] + take].tolist())
                self.pos[name] += take
            x = data[idx[self.shard]]
            if self.hflip:  # drawn for the global batch on every rank, so the generators stay equal
                flip = (torch.rand(len(idx), generator=self.generator) < 0.5)[self.shard]
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            batch[name] = x.pin_memory() if self.pin_memory else x
        return batch

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "epoch": dict(self.epoch),
            "pos": dict(self.pos),
            "perm": {k: v.clone() for k, v in self.perm.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.pos = dict(state["epoch"]), dict(state["pos"])
        self.perm = {k: v.clone() for k, v in state["perm"].items()}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, iterations: int, decay_fraction: float) -> float:
    """1 until the last `decay_fraction` of training, then linearly down to 0 at the last step."""
    decay_start = int(iterations * (1.0 - decay_fraction))
    if step < decay_start or decay_fraction <= 0:
        return 1.0
    return max(0.0, 1.0 - (step - decay_start) / max(1, iterations - decay_start))


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        if device.type != "cuda":
            raise ScanomalyError("--precision 16-mixed needs a CUDA device; on CPU use bf16")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # runs.write_weights: atomic, and readable like any file this process writes (safetensors' own
    # save_file leaves it 0600)
    write_weights({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def flat_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    seconds: float  # training-loop time over all attempts: this process's plus what checkpoints credit from before
    iterations_per_second: float  # of this process's iterations
    earlier_seconds: float = 0.0  # the part of `seconds` spent before the resume (0 for an uninterrupted run)
    best_step: int | None = None
    best_metric: float | None = None
    history: list[dict] = field(default_factory=list)  # per-checkpoint evaluations
    # the scoring modules' weights at `best_step` ({"module.param": tensor}), in memory whether or not the run
    # has a work folder; None without an evaluation
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


class GANTrainer:
    """Runs a GANTask for `config.iterations` iterations, resumably, in `work_dir`, at `precision`
    ("32" | "bf16" | "16-mixed")."""

    def __init__(
        self,
        task: GANTask,
        sets: dict[str, torch.Tensor],
        config: LoopConfig,
        work_dir=None,
        device: torch.device | str = "cpu",
        progress: bool = True,
        evaluate: Callable[[dict[str, nn.Module]], float] | None = None,
        sample_batch: dict[str, torch.Tensor] | None = None,
        precision: str = "32",
    ):
        if not isinstance(config, LoopConfig):
            raise TypeError(f"GANTrainer needs a LoopConfig (a method's Config extends it), got {type(config).__name__}")
        self.task, self.config, self.precision = task, config, precision
        self.device = torch.device(device)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.progress = progress
        self.evaluate = evaluate  # label-free checkpoint score, higher is better (AUCp)
        self.sample_batch = sample_batch
        self.world = distributed.world()
        self.stream = BatchStream(sets, config.batch_size, config.seed, config.hflip, self.world,
                                  pin_memory=self.device.type == "cuda")
        self._ddp: dict[str, nn.Module] = {}  # phase name -> its DistributedDataParallel wrapper
        # ema_decay 0: score with the raw networks
        ema_names = task.ema_modules if config.ema_decay > 0 else ()
        self.ema = {name: EMA(task.modules()[name], config.ema_decay) for name in ema_names}
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # the scoring modules at best_step
        self.history: list[dict] = []
        # loop time credited by the checkpoint this run resumed from (time spent before a kill on iterations
        # after the last checkpoint is redone, so it is not counted)
        self.earlier_seconds = 0.0
        self._t0: float | None = None
        for opt in task.optimizers().values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    # -- modules used for scoring: the EMA copies where they exist -----------------------------
    def scoring_modules(self) -> dict[str, nn.Module]:
        mods = dict(self.task.modules())
        mods.update({name: ema.module for name, ema in self.ema.items()})
        return mods

    # -- checkpointing ---------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return None if self.work_dir is None else self.work_dir / CHECKPOINT

    @property
    def _writes(self) -> bool:
        """Whether this process writes files (rank 0 of a distributed run; the only process otherwise)."""
        return self.work_dir is not None and self.world.is_main

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.task.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.task.optimizers().items()},
            "ema": {k: e.state_dict() for k, e in self.ema.items()},
            "scaler": self.scaler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
            },
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": self.history,
            "iterations": self.config.iterations,
            "seconds": self.elapsed_seconds(),
        }

    def elapsed_seconds(self) -> float:
        """Training-loop time up to now, including attempts before a resume."""
        return self.earlier_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for k, m in self.task.modules().items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.task.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        for k, e in self.ema.items():
            e.load_state_dict(state["ema"][k])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        # RNG states are CPU byte tensors, but torch.load(map_location=cuda) moved them to the GPU
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if len(state["rng"]["cuda"]) and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        _set_numpy_rng_state(state["rng"]["numpy"])
        _set_python_rng_state(state["rng"]["python"])
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.history = list(state["history"])
        best_file = self.work_dir / BEST if self.work_dir is not None else None
        if self.best_step is not None and best_file is not None and best_file.is_file():
            # the best weights of the checkpoints before the resume (every rank reads the same file)
            self.best_state = {k: v.to(self.device) for k, v in load_file(str(best_file)).items()}
        self.earlier_seconds = float(state.get("seconds", 0.0))  # absent in checkpoints written before it was kept

    def save_checkpoint(self) -> None:
        if self._writes:  # the ranks hold identical states: one copy is enough
            path = self._checkpoint_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(self.state_dict(), path)
            if self.config.keep_snapshots:
                snap_dir = self.work_dir / "snapshots"
                snap_dir.mkdir(exist_ok=True)
                _atomic_safetensors(flat_state(self.scoring_modules()), snap_dir / f"step_{self.step:07d}.safetensors")
        distributed.barrier()  # nobody runs ahead of a checkpoint it might have to resume from

    def try_resume(self) -> bool:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return False
        try:
            # weights_only: a checkpoint is data, never code
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # a corrupt file must not be silently trained over
            raise ScanomalyError(f"{path}: cannot read checkpoint ({exc}); move it away to start afresh") from None
        if state.get("iterations") != self.config.iterations:
            # a longer/shorter run changes the lr schedule: resuming would not equal an uninterrupted run
            raise ScanomalyError(
                f"{path} was written by a run of {state.get('iterations')} iterations, this one asks for "
                f"{self.config.iterations}; use the same --iters or a new --out folder"
            )
        # the RNG state must live on the CPU whatever map_location did
        state["rng"]["torch"] = state["rng"]["torch"].cpu()
        state["stream"]["generator"] = state["stream"]["generator"].cpu()
        self.load_state_dict(state)
        return True

    # -- one iteration -------------------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.config.iterations, self.config.lr_decay_fraction)
        for opt in self.task.optimizers().values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return factor

    def _phase_loss(self, phase: Phase, batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.world.distributed:
            return self.task.loss(phase.name, batch)
        if phase.name not in self._ddp:
            # built once the phase's modules are the ones requiring grad: DDP syncs exactly those
            wrapper = _PhaseLoss(self.task, phase, self.task.modules())
            self._ddp[phase.name] = nn.parallel.DistributedDataParallel(
                wrapper,
                device_ids=[self.device.index if self.device.index is not None else torch.cuda.current_device()]
                if self.device.type == "cuda" else None,
                # False (DDP's cheaper default): every method's phase loss reaches every parameter of the networks
                # that phase trains; a loss that left one without a gradient would make DDP stop with an error
                find_unused_parameters=False,
            )
        return self._ddp[phase.name](batch)

    def _run_phase(self, phase: Phase, batch) -> dict[str, float]:
        modules, optimizer = self.task.modules(), self.task.optimizers()[phase.optimizer]
        trained = set(phase.modules)
        for name, m in modules.items():  # freeze the others: no wasted gradients
            m.requires_grad_(name in trained)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.precision):
            loss, logs = self._phase_loss(phase, batch)
        if self.world.distributed:
            # logs (and the NaN check) as means over ranks: every rank takes the same decisions
            # (stop on NaN, GANomaly's discriminator re-initialisation) or a rank would hang
            keys = list(logs)
            means = distributed.all_mean(torch.tensor([float(loss.detach()), *(float(logs[k]) for k in keys)], dtype=torch.float64,
                                                      device=self.device if self.device.type == "cuda" else "cpu"))
            finite = bool(torch.isfinite(means[0]))
            logs = {k: float(v) for k, v in zip(keys, means[1:].tolist())}
        else:
            finite = bool(torch.isfinite(loss))
        if not finite:
            raise _NonFinite(phase.name, logs)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        for name in phase.modules:
            if name in self.ema:
                self.ema[name].update(modules[name])
        self.task.after_step(phase.name, logs)
        return logs

    def fit(self) -> TrainResult:
        s = self.config
        torch.set_flush_denormal(True)  # denormals make CPU training ~10x slower (see detector.flush_denormals)
        seed_everything(s.seed)
        resumed = self.try_resume()
        log_path = self.work_dir / "losses.csv" if self._writes else None
        if log_path is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            _truncate_log(log_path, self.step)
        start_step, self._t0 = self.step, time.perf_counter()
        window: dict[str, list[float]] = {}
        bar = tqdm(
            total=s.iterations, initial=self.step, disable=not (self.progress and self.world.is_main),
            desc="training" if not self.world.distributed else f"training ({self.world.size} processes)",
            dynamic_ncols=True,
        )
        if resumed:
            bar.write(f"resumed from {self._checkpoint_path()} at iteration {self.step}")
        for m in self.task.modules().values():
            m.train()
        try:
            while self.step < s.iterations:
                lr = self._set_lr()
                batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next().items()}
                for phase in self.task.phases():
                    if (self.step + 1) % phase.every == 0:
                        for k, v in self._run_phase(phase, batch).items():
                            window.setdefault(k, []).append(float(v))
                self.step += 1
                if self.step % LOG_EVERY == 0 or self.step == s.iterations:
                    means = {k: float(np.mean(v)) for k, v in window.items()}
                    window.clear()
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:4]}, refresh=False)
                    if log_path is not None:
                        _append_log(log_path, {"step": self.step, "seconds": round(self.elapsed_seconds(), 1),
                                               "lr_factor": lr, **means})
                if self.sample_batch is not None and self._writes and (
                    self.step % s.sample_every == 0 or self.step == s.iterations
                ):
                    self._write_samples()
                if self.step % s.checkpoint_every == 0 or self.step == s.iterations:
                    self._sync_buffers()
                    self._evaluate_checkpoint(bar)
                    self.save_checkpoint()
                bar.update(1)
        except _NonFinite as exc:
            bar.close()
            where = self._checkpoint_path()
            kept = f"the last good checkpoint is kept in {where}" if where and where.is_file() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training diverged at iteration {self.step + 1}: the {exc.phase} loss became NaN/inf "
                f"({', '.join(f'{k}={v:.3g}' for k, v in exc.logs.items())}); {kept}. "
                "Try a lower learning rate, --precision 32, or a different --seed."
            ) from None
        bar.close()
        seconds = time.perf_counter() - self._t0  # this process's share
        total, self._t0 = self.elapsed_seconds(), None
        done = self.step - start_step
        return TrainResult(
            steps=self.step,
            seconds=total,
            iterations_per_second=done / seconds if seconds > 0 and done else float("nan"),
            earlier_seconds=self.earlier_seconds,
            best_step=self.best_step,
            best_metric=self.best_metric,
            history=self.history,
            best_state=self.best_state,
        )

    def _sync_buffers(self) -> None:
        """Average BatchNorm running statistics (all float buffers) over the ranks.

        DDP syncs gradients, not buffers updated in forward passes outside it, so each rank's running
        statistics drift from its own batches. Averaging them at every checkpoint gives every rank,
        the checkpoint and the saved model one estimate over the global batches.
        """
        if not self.world.distributed:
            return
        modules = [*self.task.modules().values(), *(e.module for e in self.ema.values())]
        for module in modules:
            for buf in module.buffers():
                if buf.is_floating_point():
                    buf.copy_(distributed.all_mean(buf))

    def _evaluate_checkpoint(self, bar) -> None:
        if self.evaluate is None:
            return
        mods = self.scoring_modules()
        metric = None
        if self.world.is_main:  # one rank evaluates; the others get its number
            for m in mods.values():
                m.eval()
            # an evaluation must not move the training RNG (ranks must keep drawing alike)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                metric = float(self.evaluate(mods))
            for m in self.task.modules().values():
                m.train()
        metric = distributed.broadcast_object(metric)
        self.history.append({"step": self.step, "metric": metric})
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_step = metric, self.step
            # every rank keeps the best weights in memory (the ranks' modules are identical); the file is for resuming
            self.best_state = {k: v.detach().clone() for k, v in flat_state(mods).items()}
            if self._writes:
                _atomic_safetensors(self.best_state, self.work_dir / BEST)
        distributed.barrier()  # best.safetensors is complete before any rank may resume from it
        if self.progress and self.world.is_main:
            bar.write(f"iteration {self.step}: checkpoint metric {metric:.4f} (best {self.best_metric:.4f} at {self.best_step})")

    def _write_samples(self) -> None:
        from ..viz import save_sample_grid

        # every network in eval mode while sampling, the live ones too: BatchNorm must not learn
        # running statistics from the 8-image sample batch
        for m in [*self.scoring_modules().values(), *self.task.modules().values()]:
            m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # rank 0 only: must not move the RNG
            batch = {k: v.to(self.device) for k, v in self.sample_batch.items()}
            rows = self.task.sample_rows(batch, self.scoring_modules())
        for m in self.task.modules().values():
            m.train()
        if rows:
            out = self.work_dir / "samples"
            out.mkdir(exist_ok=True)
            save_sample_grid(out / f"step_{self.step:07d}.png", rows)


class _PhaseLoss(nn.Module):
    """One phase's loss as a module holding the networks that phase trains, so that
    DistributedDataParallel can wrap it: DDP then averages exactly those networks' gradients over
    the ranks, after whatever the loss does inside (several forward passes, the gradient penalty's
    double backward), with no change to the methods' code."""

    def __init__(self, task: GANTask, phase: Phase, modules: dict[str, nn.Module]):
        super().__init__()
        self.trained = nn.ModuleDict({name: modules[name] for name in phase.modules})
        self._task, self._phase = task, phase.name  # plain attributes: not registered as submodules

    def forward(self, batch):
        return self._task.loss(self._phase, batch)


class _NonFinite(Exception):
    def __init__(self, phase: str, logs: dict):
        self.phase, self.logs = phase, logs


# RNG states as plain tensors and numbers, so that checkpoints load with weights_only=True
def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(s: dict) -> None:
    np.random.set_state(("MT19937", s["keys"].cpu().numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_python_rng_state(s: dict) -> None:
    random.setstate((s["version"], tuple(s["internal"]), s["gauss"]))


def _append_log(path: Path, row: dict) -> None:
    """Append a row; the header is fixed by the first row (later keys are ignored, missing ones blank)."""
    header = None
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header or list(row), extrasaction="ignore")
        if header is None:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log rows written after the checkpoint we resume from."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = lines[:1] + [ln for ln in lines[1:] if ln and int(ln.split(",", 1)[0]) <= step]
    path.write_text("\n".join(keep) + "\n" if keep else "")
