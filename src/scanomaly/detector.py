"""The Detector interface every method implements, and the registry the CLI looks methods up in.

Four verbs, in the spirit of scikit-learn:

    det = get_method("healthygan")(config, preprocessing)
    det.fit(healthy, unlabeled=None)        # ImageSets (or [N, C, S, S] tensors in [-1, 1])
    scores, maps = det.score(images)        # [N] float, [N, S, S] float (higher = more anomalous)
    det.save(run_dir); det = Detector.load(run_dir)

A saved model is `model.safetensors` (every tensor: weights, buffers, memory banks) plus
`model.json` (method name, config, preprocessing), so it scores new images exactly as in
training. Nothing is pickled.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file

from . import runs
from .data import ImageSet
from .errors import ScanomalyError
from .preprocess import Preprocessing
from .training.loop import TrainResult, autocast_context

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"

PRECISIONS = ("32", "bf16", "16-mixed")

_REGISTRY: dict[str, type["Detector"]] = {}


def register(cls: type["Detector"]) -> type["Detector"]:
    """Class decorator: make a method available by its `name` (CLI, benchmark, `Detector.load`)."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type["Detector"]:
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise ScanomalyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _import_builtin_methods() -> None:
    # importing the package registers every built-in method
    from . import methods  # noqa: F401


def as_tensor(images) -> torch.Tensor:
    """Accept an ImageSet or a [N, C, S, S] tensor."""
    if isinstance(images, ImageSet):
        return images.images
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images
    raise ScanomalyError(f"expected an ImageSet or a [N, C, H, W] tensor, got {type(images).__name__}")


class Detector(abc.ABC):
    """Base class. Subclasses set `name` and `Config` (a dataclass), and implement
    `fit`, `score`, and `state_tensors` / `load_state_tensors` (everything learned, as tensors)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    needs_unlabeled: ClassVar[bool] = False  # True for HealthyGAN (trains on healthy + mixed)
    takes_holdout: ClassVar[bool] = False  # True where fit takes holdout= (held-out healthy images, e.g. for AUCp)
    distributed_training: ClassVar[bool] = False  # True for the GANs: they train in training.loop, torchrun-ready
    # named settings: {"cpu": {"config": {...}, "preprocessing": {...}}, "paper": {...}, "tiny": {...}}
    profiles: ClassVar[dict[str, dict]] = {}

    def __init__(
        self,
        config=None,
        preprocessing: Preprocessing | None = None,
        device: str = "cpu",
        precision: str = "32",
    ):
        self.config = config if config is not None else self.Config()
        self.preprocessing = preprocessing if preprocessing is not None else Preprocessing()
        self.device = torch.device(resolve_device(device))
        if precision not in PRECISIONS:
            raise ScanomalyError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "16-mixed" and self.device.type != "cuda":
            # float16 autocast needs a GradScaler and CUDA kernels; on a CPU bf16 is the half-precision option
            raise ScanomalyError(f"--precision 16-mixed needs a CUDA device (this one is {self.device}); on CPU use bf16 or 32")
        self.precision = precision
        flush_denormals()
        if precision == "bf16" and self.device.type == "cpu":
            ensure_cpu_bf16()

    @classmethod
    def from_profile(
        cls,
        profile: str = "cpu",
        config_overrides: dict | None = None,
        preprocessing_overrides: dict | None = None,
        device: str = "cpu",
        precision: str = "32",
    ) -> "Detector":
        """Build a detector from a named profile, with explicit options taking precedence."""
        if profile not in cls.profiles:
            raise ScanomalyError(f"{cls.name}: unknown profile {profile!r}; available: {', '.join(cls.profiles)}")
        chosen = cls.profiles[profile]
        config = config_from_dict(cls.Config, {**chosen.get("config", {}), **(config_overrides or {})})
        prep = Preprocessing.from_dict({**chosen.get("preprocessing", {}), **(preprocessing_overrides or {})})
        return cls(config, prep, device=device, precision=precision)

    def reconstruct(self, images, batch_size: int = 64) -> np.ndarray | None:
        """The model's normal-looking version of each image ([N, C, S, S] in [-1, 1]), if it has one.
        HealthyGAN's healthy translation, an autoencoder's reconstruction; None for feature methods."""
        return None

    def score_and_reconstruct(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`score` and `reconstruct` together (heatmap panels show both); one pass where the method can."""
        scores, maps = self.score(images, batch_size)
        return scores, maps, self.reconstruct(images, batch_size)

    # -- export -----------------------------------------------------------------------------
    # why a method gives no `scoring_network` (the message of `scanomaly export`)
    not_exportable_because: ClassVar[str] = "its score is not one forward pass of a network"

    def scoring_network(self) -> torch.nn.Module:
        """The whole scoring computation as one module: x [N, C, S, S] in [-1, 1] ->
        (reconstruction [N, C, S, S], scores [N]), or (reconstruction, scores, heatmap [N, S, S]) for a
        method whose heatmap is not |x − reconstruction| (DDAD's discrepancy maps). A method that has one
        scores through it, so what `scanomaly export` writes to ONNX is exactly what `score` computes."""
        raise ScanomalyError(f"{self.name} cannot be exported to ONNX: {self.not_exportable_because}")

    # -- the verbs ------------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, healthy, unlabeled=None, **kwargs) -> "Detector":
        ...

    @abc.abstractmethod
    def score(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        ...

    # -- persistence ----------------------------------------------------------------------
    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        ...

    def training_seconds_before_resume(self) -> float:
        """Training time that the last `fit` took over from checkpoints of an interrupted earlier attempt.

        Every training loop result the detector keeps (`TrainResult`, one per stage) counts; 0 for methods without a
        loop and for uninterrupted runs. The benchmark adds it to its own clock so a resumed run reports its whole cost.
        """
        return float(sum(v.earlier_seconds for v in vars(self).values() if isinstance(v, TrainResult)))

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable state beyond the config (e.g. score normalisation constants)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_tensors().items()}
        runs.drop_stale_exports(directory)  # an export of the weights being replaced must not outlive them
        weights_sha256 = runs.write_weights(tensors, directory / MODEL_WEIGHTS)
        meta = {
            "method": self.name,
            "config": config_to_dict(self.config),
            "preprocessing": self.preprocessing.to_dict(),
            "extra": self.extra_state(),
        }
        (directory / MODEL_CONFIG).write_text(json.dumps(runs.seal_meta(meta, weights_sha256), indent=2, default=str))
        self.weights_sha256 = weights_sha256
        return directory

    @staticmethod
    def load(directory, device: str = "cpu", precision: str = "32") -> "Detector":
        """A saved model, to score on `device` at `precision` (its weights are float32 whatever it trained with)."""
        directory = Path(directory)
        meta_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
        if not meta_path.is_file() or not weights_path.is_file():
            raise ScanomalyError(f"{directory}: not a saved model (expected {MODEL_CONFIG} and {MODEL_WEIGHTS})")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScanomalyError(f"{meta_path}: corrupt model config ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
            raise ScanomalyError(f"{meta_path}: not a model config (no 'method' entry)")
        weights_sha256 = runs.verify_model(directory, meta, meta_path, weights_path)
        try:
            cls = get_method(meta["method"])
            det = cls(config_from_dict(cls.Config, meta["config"]), Preprocessing.from_dict(meta["preprocessing"]),
                      device=device, precision=precision)
        except ScanomalyError as exc:
            raise ScanomalyError(f"{meta_path}: {exc}") from None
        except Exception as exc:  # a config its method cannot be built from
            raise runs.describe_load_failure(meta_path, exc) from None
        try:
            det.load_state_tensors(load_file(str(weights_path)))
        except Exception as exc:  # truncated / empty file, or tensors of another shape than the config's network
            raise runs.describe_load_failure(weights_path, exc) from None
        try:
            det.load_extra_state(meta.get("extra", {}))
        except Exception as exc:
            raise runs.describe_load_failure(meta_path, exc) from None
        det.weights_sha256, det.model_dir = weights_sha256, directory
        return det


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU.

    GAN weights and gradients drift into the denormal range, where x86 arithmetic is ~100x
    slower: on 2 cores HealthyGAN's cpu profile ran 10x slower without this (BENCHMARKS.md).
    Values that small carry no information for these models.
    """
    torch.set_flush_denormal(True)


_BF16_PROBE = (
    "import torch\n"
    "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
    "    torch.nn.Conv2d(8, 8, 3)(torch.randn(2, 8, 16, 16)).sum().backward()\n"
    # transposed convolutions (every decoder and upsampler here) run other oneDNN kernels, which
    # die on such CPUs where the convolution above does not
    "    torch.nn.ConvTranspose2d(8, 8, 4, 2, 1)(torch.randn(2, 8, 8, 8)).sum().backward()\n"
)


def ensure_cpu_bf16(run=None) -> bool:
    """Make CPU bf16 safe where the CPU advertises AMX tiles that the kernel or hypervisor does not
    enable (oneDNN then dies with SIGILL, as on this project's CI machines).

    A bf16 convolution is tried once in a subprocess; if it dies, oneDNN is capped at AVX-512 bf16
    for this process (ONEDNN_MAX_CPU_ISA, read when oneDNN first runs). Returns True if capped.
    """
    import os
    import subprocess
    import sys
    import warnings

    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        return False
    run = run or subprocess.run
    probe = run([sys.executable, "-c", _BF16_PROBE], capture_output=True, timeout=120)
    if probe.returncode == 0:
        return False
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    warnings.warn(
        "bf16 with this CPU's AMX units crashed in a test run (exit code "
        f"{probe.returncode}); using AVX-512 bf16 instead, which may be slower than --precision 32"
    )
    return True


def anomaly_map(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """|x − reconstruction| averaged over channels: [N, S, S]. The heatmap of every method that
    compares a scan with a normal-looking version of it."""
    return (x - reconstruction).abs().mean(1)


def module_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{"name.param": tensor} for a dict of modules (what `state_tensors` returns)."""
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def load_module_state(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `module_state`, strict per module."""
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        m.eval()


class ReconstructionDetector(Detector):
    """A method that scores a scan against a normal-looking version of it (every GAN method here).

    Subclasses give `scoring_network()` (the score is one forward pass: exportable to ONNX; it returns
    (reconstruction, scores) or (reconstruction, scores, heatmap)) or,
    when it is not (AnoGAN's latent search), override `_reconstruct_and_score(x)` for one batch
    already on the device. Batching, the heatmap |x − reconstruction| (unless the network gives its
    own) and `reconstruct` are written once, here.
    """

    _compiled_network: torch.nn.Module | None = None

    def compile(self) -> "ReconstructionDetector":
        """Score through `torch.compile` of the scoring network from now on. The first batch of each
        size pays for compilation; worth it for long scoring jobs (BENCHMARKS.md, scoring throughput)."""
        try:
            network = self.scoring_network()
        except ScanomalyError:
            raise ScanomalyError(f"{self.name} cannot be compiled: {self.not_exportable_because}") from None
        self._compiled_network = torch.compile(network)
        return self

    def _reconstruct_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """([N, C, S, S] reconstruction, [N] scores[, [N, S, S] heatmap]) of a batch."""
        network = self._compiled_network if self._compiled_network is not None else self.scoring_network()
        return self._run_scoring(network, x)

    def _run_scoring(self, network: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A scoring network on a batch: eval mode, no gradients, the detector's precision."""
        network.eval()
        with torch.no_grad(), autocast_context(self.device, self.precision):
            return network(x.to(self.device))

    def _batches(self, images, batch_size: int):
        x_all = as_tensor(images)
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size].to(self.device, non_blocking=True)  # async from pinned memory on a GPU
            reconstruction, scores, *heatmap = self._reconstruct_and_score(x)
            reconstruction = reconstruction.detach().float()
            # a scoring network may give its own heatmap as a third output (HealthyGAN's feature score)
            heatmap = heatmap[0].detach().float() if heatmap else anomaly_map(x, reconstruction)
            yield heatmap, reconstruction, scores.detach()

    def score(self, images, batch_size: int = 64):
        scores, maps, _ = self._collect(images, batch_size, keep_reconstructions=False)
        return scores, maps

    def reconstruct(self, images, batch_size: int = 64):
        return self._collect(images, batch_size, keep_reconstructions=True)[2]

    def score_and_reconstruct(self, images, batch_size: int = 64):
        return self._collect(images, batch_size, keep_reconstructions=True)

    def _collect(self, images, batch_size: int, keep_reconstructions: bool):
        scores, maps, reconstructions = [], [], []
        for heatmap, reconstruction, s in self._batches(images, batch_size):
            scores.append(s.cpu())
            maps.append(heatmap.cpu())
            if keep_reconstructions:
                reconstructions.append(reconstruction.cpu())
        if not scores:
            size = self.preprocessing.image_size
            return np.zeros(0, np.float64), np.zeros((0, size, size), np.float32), None
        return (torch.cat(scores).numpy(), torch.cat(maps).numpy().astype(np.float32),
                torch.cat(reconstructions).numpy() if keep_reconstructions else None)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScanomalyError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    return device


def config_to_dict(config) -> dict:
    return asdict(config) if is_dataclass(config) else dict(vars(config))


def config_from_dict(config_cls, d: dict):
    if not is_dataclass(config_cls):
        return config_cls()
    known = {f.name for f in fields(config_cls)}
    # options this version no longer has: accepted (and dropped) at the value the code now behaves as
    retired = {k: v for k, v in getattr(config_cls, "retired_options", {}).items() if k in d and k not in known}
    for key, kept in retired.items():
        if d[key] != kept:
            raise ScanomalyError(f"{config_cls.__qualname__} option {key}={d[key]!r} is no longer supported "
                                 f"(this version always behaves as {key}={kept!r})")
    d = {k: v for k, v in d.items() if k not in retired}
    unknown = set(d) - known
    if unknown:
        raise ScanomalyError(f"unknown {config_cls.__qualname__} option(s): {sorted(unknown)}")
    # JSON turns tuples into lists; give tuples back where the default is one
    defaults = {f.name: f.default for f in fields(config_cls)}
    clean = {k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v for k, v in d.items()}
    return config_cls(**clean)
