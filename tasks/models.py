"""The round's ensemble folder, assembled from its trained members."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from data_catalog.preprocessing import PreprocessSettings
from data_catalog.selection import Calibration
from viola_models.inference.ensemble import write_ensemble


@task(name="assemble-ensemble")
def assemble_ensemble(folder: Path, members: list[dict], preprocess: PreprocessSettings,
                      calibration: dict | None = None, points_csv: str = "", **meta) -> str:
    """The round's ensemble folder from its trained members (and the calibration they were scored with)."""
    listed = [{k: m[k] for k in ("name", "checkpoint", "architecture", "fold", "val_dice", "run_id")}
              for m in members]
    write_ensemble(Path(folder), listed, preprocess,
                   calibration=Calibration.from_dict(calibration) if calibration else None,
                   calibration_points=pd.read_csv(points_csv) if points_csv else None, **meta)
    return str(folder)
