"""Where a trained ensemble lives: assembled from a round's members, found again from a registry
URI, a round of a data root, or a folder."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from prefect import task

from data_catalog.preprocessing import PreprocessSettings
from data_catalog.selection import Calibration
from tasks import tracking
from viola_models.ensemble import write_ensemble


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


def resolve_ensemble_dir(model_uri: str | None = None, round_: int | None = None, checkpoints: Path | None = None,
                         work_dir: Path | None = None, registered_model: str | None = None,
                         tracking_uri: str | None = None, download_to: Path | None = None) -> Path:
    """The local folder of an ensemble, from exactly one of: ``checkpoints`` (a folder),
    ``round_`` (``work_dir/rounds/round_NNN/ensemble``), ``model_uri`` (e.g.
    ``models:/NAME@champion``, downloaded from MLflow) or, with none given, the champion of
    ``registered_model`` in the local registry. A registry model is downloaded into ``download_to``
    (a temporary folder of the caller's, so nothing is left behind)."""
    given = [x is not None for x in (model_uri, round_, checkpoints)]
    if sum(given) > 1:
        raise ValueError("give at most one of --model, --round and --checkpoints")
    if checkpoints is not None:
        if not Path(checkpoints).is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoints} does not exist")
        return Path(checkpoints)
    if round_ is not None:
        folder = Path(work_dir or ".") / "rounds" / f"round_{round_:03d}" / "ensemble"
        if not (folder / "ensemble.json").exists():
            raise FileNotFoundError(f"round {round_} has no finished ensemble in {folder}")
        return folder
    uri = tracking_uri or tracking.default_tracking_uri(create=False)
    model_uri = model_uri or f"models:/{registered_model}@champion"
    store = tracking.sqlite_path(uri)
    if store is not None and not store.is_file():  # reading must not create an empty store
        raise FileNotFoundError(f"cannot load {model_uri}: there is no MLflow store at {store} (run `viola run` "
                                "first, give --tracking-uri, or give --checkpoints or --round)")
    tracking.client_for(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=uri,
                                                        dst_path=str(download_to) if download_to else None))
    except mlflow.exceptions.MlflowException as e:
        first = str(e).splitlines()[0]
        raise FileNotFoundError(f"cannot load {model_uri} from {uri}: {first} (run `viola run` first, or give "
                                "--checkpoints or --round)") from None
