"""The round context: what every task of one arm of one round shares, made once by the flow.

A task takes the context whole, plus what is its own (the scans it works on, the ensemble it
scores), instead of the same tracking URI, run id, round number, folders, device and inference
settings passed again at every call. The context is plain, frozen data: it travels to Ray workers
as it is, and a worker that needs another store (a served one) gets a copy with
:meth:`RoundContext.with_tracking`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.rounds import RoundPlan

if TYPE_CHECKING:  # the validated profile; tasks read it, only flows load it
    from flows.profiles import PipelineSettings
    from viola_models.inference.backends import InferenceSettings

__all__ = ["RoundContext"]


@dataclass(frozen=True)
class RoundContext:
    """One arm of one round: its settings, its plan (round, arm, folder, MLflow run, teacher), the
    tracking store and this process's device.

    ``device`` is the device resolved in the flow's own process (calibration, and every task run
    in it); a worker resolves ``settings.device`` on its own machine (``tasks.compute.worker_device``).
    """

    settings: PipelineSettings
    plan: RoundPlan
    tracking_uri: str
    device: str

    @property
    def round(self) -> int:
        return self.plan.round

    @property
    def arm(self) -> str:
        return self.plan.arm

    @property
    def name(self) -> str:
        return self.plan.name or f"round {self.plan.round}"

    @property
    def dir(self) -> Path:
        """The arm's own folder (``rounds/round_NNN[-arm]``)."""
        return Path(self.plan.dir)

    @property
    def run_id(self) -> str:
        """The arm's MLflow run (the members' parent)."""
        return self.plan.state["run_id"]

    @property
    def experiment_id(self) -> str:
        return self.plan.state["experiment_id"]

    @property
    def cache(self) -> Path:
        """The preprocessing cache of the data root's work folder."""
        return self.settings.work_dir / "cache"

    @property
    def data_root(self) -> Path:
        return Path(self.settings.data.root)

    @property
    def inference(self) -> InferenceSettings:
        return self.settings.inference_settings()

    @property
    def evaluate(self) -> dict:
        """Keyword settings of ``viola_models.evaluation.scoring.evaluate_scans`` for the test scans."""
        e = self.settings.evaluate
        return {"overlap": e.overlap, "tta": e.tta, "nsd_tolerance_mm": e.nsd_tolerance_mm}

    def with_tracking(self, tracking_uri: str) -> RoundContext:
        """The same context logging to another URI of the same store (e.g. served to workers)."""
        return replace(self, tracking_uri=tracking_uri)
