"""ONNX export of the methods whose score is one forward pass, and scoring with ONNX Runtime.

    scanomaly export RUN --format onnx [--out FILE] [--opset N]      writes RUN/model/model.onnx
    scanomaly score RUN IMAGES --runtime onnx --out scores.csv

The graph is the detector's own scoring network (`Detector.scoring_network`, the module its `score`
runs) plus the heatmap, so an exported model computes what `Detector.score` / `reconstruct` return:

    input   image           [N, C, S, S] float32, preprocessed, in [-1, 1]
    outputs score           [N]           higher = more anomalous (float64 for ALOCC, else float32)
            heatmap         [N, S, S]     |x − reconstruction| averaged over channels (HealthyGAN
                                          with score=features: its feature-distance map; DDAD: its discrepancy map)
            reconstruction  [N, C, S, S]  the healthy translation / reconstruction, in [-1, 1]

N is a dynamic axis. The file carries what is needed to prepare images: `metadata_props["scanomaly"]`
is JSON with the method, its config, the preprocessing and the scanomaly version, and `OnnxScorer`
reads new images with that preprocessing.

HealthyGAN, f-AnoGAN, GANomaly, ALAD, ALOCC and DDAD export. AnoGAN (a latent search per image) and
PaDiM / PatchCore (statistics and memory banks next to a backbone) do not: `export_onnx` raises a
ScanomalyError that says why.

The TorchScript-based exporter (`dynamo=False`) is used: the torch.export-based one needs the
onnxscript package, which scanomaly does not depend on, and these networks (convolutions, norms,
no control flow) trace exactly. Every export is checked by running ONNX Runtime on a batch of a
size other than the traced one (the dynamic axis) and comparing with PyTorch.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import __version__, runs
from .detector import Detector, anomaly_map, as_tensor, config_to_dict
from .errors import ScanomalyError
from .preprocess import Preprocessing
from .threads import default_threads

ONNX_FILE = "model.onnx"  # the default place: beside model.safetensors in the model folder
METADATA_KEY = "scanomaly"
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "heatmap", "reconstruction")
# recent, and read by every maintained ONNX Runtime (1.14 and later); 20 is the newest the
# TorchScript-based exporter writes
DEFAULT_OPSET = 18
OPSET_RANGE = (13, 20)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ScanomalyError(
            f"ONNX export and scoring need the '{module}' package: pip install 'scanomaly[onnx]' "
            "(onnx and onnxruntime)"
        ) from None


class ScoringGraph(nn.Module):
    """What the ONNX file computes: a scoring network's (reconstruction, score) plus the heatmap,
    made with the same `anomaly_map` as `ReconstructionDetector.score` (or the network's own, when
    it gives one as a third output: HealthyGAN's feature score, DDAD)."""

    def __init__(self, scoring_network: nn.Module):
        super().__init__()
        self.scoring_network = scoring_network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reconstruction, scores, *heatmap = self.scoring_network(x)
        return scores, heatmap[0] if heatmap else anomaly_map(x, reconstruction), reconstruction


def _frozen_copy(network: nn.Module) -> nn.Module:
    """A CPU float32 copy in eval mode (exporting must not move or change the detector's own
    networks), with parametrizations such as ALAD's spectral norm baked into plain weights: at
    inference they are constants, and their power iteration (aten::vdot) has no ONNX form."""
    network = copy.deepcopy(network).cpu().float().eval()
    for module in list(network.modules()):
        if parametrize.is_parametrized(module):
            # a deep copy shares the class that `parametrize` made for the original module, and
            # removing a parametrization edits that class: give the copy a class of its own first
            shared = type(module)
            module.__class__ = type(shared.__name__, shared.__bases__, dict(shared.__dict__))
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return network


@dataclass
class ExportResult:
    path: Path
    opset: int
    # on a probe batch of random images: the largest |score_onnx − score_torch|
    max_score_difference: float


def export_onnx(detector: Detector, path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Write `detector`'s scoring as an ONNX file (float32, whatever the training precision) with a
    dynamic batch axis and the preprocessing in its metadata; check it against PyTorch with ONNX Runtime."""
    onnx = _require("onnx")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ScanomalyError(f"--opset must be in {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                             f"(the TorchScript-based exporter's range), got {opset}")
    graph = ScoringGraph(_frozen_copy(detector.scoring_network())).eval()
    prep = detector.preprocessing
    probe = torch.Generator().manual_seed(0)
    traced_input = torch.rand(2, prep.channels, prep.image_size, prep.image_size, generator=probe) * 2 - 1
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice and tracer warnings about Python values becoming
        # constants; whether the graph generalises is checked below, on another batch size
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (traced_input,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "method": detector.name,
        "config": config_to_dict(detector.config),
        "preprocessing": prep.to_dict(),
        "scanomaly_version": __version__,
        "opset": opset,
        runs.WEIGHTS_KEY: runs.scorer_weights(detector),  # scoring refuses it beside other weights
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
    }
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))

    check_input = torch.rand(3, prep.channels, prep.image_size, prep.image_size, generator=probe) * 2 - 1
    with torch.no_grad():
        torch_scores = graph(check_input)[0].double().numpy()
    onnx_scores = OnnxScorer(path).score(check_input, batch_size=len(check_input))[0].astype(np.float64)
    difference = float(np.max(np.abs(onnx_scores - torch_scores)))
    if difference > 1e-4 * max(1.0, float(np.max(np.abs(torch_scores)))):
        warnings.warn(f"{path}: ONNX Runtime's scores differ from PyTorch's by up to {difference:.3g} on a probe batch; "
                      "check the export before using it")
    return ExportResult(path, opset, difference)


def read_onnx_metadata(path) -> dict:
    """The scanomaly metadata of an exported file (method, config, preprocessing, version, opset)."""
    onnx = _require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ScanomalyError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ScanomalyError(f"{path}: not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None
    return _parse_metadata(path, {p.key: p.value for p in model.metadata_props})


def _parse_metadata(path, props: dict[str, str]) -> dict:
    if METADATA_KEY not in props:
        raise ScanomalyError(f"{path}: not a scanomaly export (no '{METADATA_KEY}' metadata); "
                             "export with `scanomaly export RUN --format onnx`")
    try:
        return json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ScanomalyError(f"{path}: corrupt '{METADATA_KEY}' metadata ({exc})") from None


def find_onnx(path) -> Path:
    """An .onnx file, or the model.onnx of a model folder (or of a run folder's model/)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / ONNX_FILE, path / "model" / ONNX_FILE):
        if candidate.is_file():
            return candidate
    raise ScanomalyError(f"{path}: no {ONNX_FILE} here; export the model first: scanomaly export {path} --format onnx")


class OnnxScorer:
    """Scores with an exported file in ONNX Runtime, with the same calls as a Detector
    (`score`, `reconstruct`, `score_and_reconstruct`, `preprocessing`, `name`)."""

    def __init__(self, path, threads: int | None = None):
        ort = _require("onnxruntime")
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()  # not every core of a shared machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # wait without spinning
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for missing or corrupt files
            raise ScanomalyError(f"{self.path}: ONNX Runtime cannot load it ({exc.__class__.__name__}: {exc})") from None
        self.metadata = _parse_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        self.name = self.metadata["method"]
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])

    def _run(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feed = {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        scores, maps, reconstruction = self.session.run(list(OUTPUT_NAMES), feed)
        return scores, maps, reconstruction

    def score_and_reconstruct(self, images, batch_size: int = 64):
        x_all = as_tensor(images)
        outputs = [self._run(x_all[i : i + batch_size]) for i in range(0, len(x_all), batch_size)]
        if not outputs:
            size = self.preprocessing.image_size
            return np.zeros(0, np.float64), np.zeros((0, size, size), np.float32), None
        scores, maps, reconstructions = (np.concatenate(parts) for parts in zip(*outputs))
        return scores, maps.astype(np.float32), reconstructions

    def score(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        scores, maps, _ = self.score_and_reconstruct(images, batch_size)
        return scores, maps

    def reconstruct(self, images, batch_size: int = 64) -> np.ndarray | None:
        return self.score_and_reconstruct(images, batch_size)[2]
