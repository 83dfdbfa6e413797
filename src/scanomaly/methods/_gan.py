"""What the GAN methods share: training through the one loop (training.loop), and the networks that
score as the saved model.

A method lists its scoring networks by attribute name (`scoring_networks`). After `fit` they are the
loop's scoring modules (the EMA copies where the method keeps an EMA, its own networks otherwise);
`save` writes them and `load` reads them back into the method's own networks, so a loaded model scores
exactly as the fitted one did.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..detector import ReconstructionDetector, as_tensor, load_module_state, module_state
from ..errors import ScanomalyError
from ..training.loop import GANTask, GANTrainer, LoopConfig, TrainResult


class GANDetector(ReconstructionDetector):
    """Base of the methods trained by the GAN loop. Subclasses set `Config` (a LoopConfig subclass) and
    `scoring_networks`, build those networks in `__init__`, and train with `_train`."""

    distributed_training = True
    scoring_networks: ClassVar[tuple[str, ...]] = ()
    train_result: TrainResult | None = None
    _scoring: dict[str, nn.Module] | None = None

    @property
    def scoring(self) -> dict[str, nn.Module]:
        """The networks that score, by name: the method's own until `fit` hands back the loop's copies."""
        if self._scoring is None:
            self._scoring = self._own_networks()
        return self._scoring

    def _own_networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.scoring_networks}

    def _healthy_tensor(self, healthy) -> torch.Tensor:
        x = as_tensor(healthy)
        if len(x) == 0:
            raise ScanomalyError(f"{self.name} needs at least one healthy training image")
        return x

    def _train(self, task: GANTask, sets: dict[str, torch.Tensor], work_dir=None, progress: bool = True, *,
               config: LoopConfig | None = None, evaluate=None, sample_batch=None) -> TrainResult:
        """One run of the loop with the detector's device and precision (`config`: default the detector's);
        the scoring networks it trains become the loop's scoring modules."""
        trainer = GANTrainer(task, sets, self.config if config is None else config, work_dir, self.device, progress,
                             evaluate, sample_batch, precision=self.precision)
        result = trainer.fit()
        trained = trainer.scoring_modules()
        self._scoring = {**self.scoring, **{k: trained[k] for k in self.scoring_networks if k in trained}}
        self._ready_to_score()
        return result

    def _ready_to_score(self) -> None:
        """Eval mode (BatchNorm on running statistics, no dropout) for every scoring network."""
        for m in self.scoring.values():
            m.eval()

    # -- persistence: the scoring networks are the model -----------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return module_state(self.scoring)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self._own_networks()
        load_module_state(own, tensors)
        self._scoring = own
        self._ready_to_score()

    def extra_state(self) -> dict[str, Any]:
        r = self.train_result
        return {} if r is None else {"trained_steps": r.steps}
