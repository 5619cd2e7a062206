"""Where a trained ensemble lives: a registry URI, a round of a data root, or a folder."""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks import tracking


def resolve_ensemble_dir(model_uri: str | None = None, round_: int | None = None, checkpoints: Path | None = None,
                         work_dir: Path | None = None, registered_model: str | None = None,
                         tracking_uri: str | None = None) -> Path:
    """The local folder of an ensemble, from exactly one of: ``checkpoints`` (a folder),
    ``round_`` (``work_dir/rounds/round_NNN/ensemble``), ``model_uri`` (e.g.
    ``models:/NAME@champion``, downloaded from MLflow) or, with none given, the champion of
    ``registered_model`` in the local registry."""
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
    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.client_for(uri)
    model_uri = model_uri or f"models:/{registered_model}@champion"
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=uri))
    except mlflow.exceptions.MlflowException as e:
        first = str(e).splitlines()[0]
        raise FileNotFoundError(f"cannot load {model_uri} from {uri}: {first} (run `viola run` first, or give "
                                "--checkpoints or --round)") from None
