"""The `viola` command line: data, the main job, serving the deployments, prediction."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="viola-ICH: intracranial haemorrhage segmentation with viola-UNet and self-training.")

_ENV_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the ephemeral API starts in 10-17 s on 2 cores; Prefect's default 20 s is too tight
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "viola_models,data_catalog,tasks,flows",
    # a line logged outside a flow run (`viola serve` freeing what a killed server left) goes to the
    # terminal only, without Prefect's warning that it could not reach the API
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def _setup(verbose: bool = False, flows: bool = False) -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    level = logging.DEBUG if verbose else logging.INFO
    for name in _ENV_DEFAULTS["PREFECT_LOGGING_EXTRA_LOGGERS"].split(","):
        logging.getLogger(name).setLevel(level)
    for noisy in ("mlflow", "alembic"):  # database set-up chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not flows:  # inside flows, Prefect's handlers print (and record) the library loggers
        logging.basicConfig(level=level, format="%(message)s")


def _profile_root(profile: str, data: Path | None, set_: list[str] | None) -> Path | None:
    """The data root a call will work on, read without importing Prefect (its settings are fixed at
    import): ``--data``, a ``--set data.root=...``, or the profile's ``[data] root``. None when the
    profile cannot be read (``load_profile`` then says why) or a user's data root does not exist
    (nothing is created there before it is checked)."""
    import tomllib

    if data is not None:
        return data.expanduser().resolve() if data.is_dir() else None
    for item in set_ or []:
        key, _, value = item.partition("=")
        if key.strip() == "data.root":
            try:
                root = Path(str(tomllib.loads(f"v = {value}")["v"])).expanduser().resolve()
            except tomllib.TOMLDecodeError:
                root = Path(value.strip()).expanduser().resolve()
            return root if root.is_dir() else None
    path = Path(profile)
    if not path.suffix:
        path = Path(__file__).resolve().parent / "profiles" / f"{profile}.toml"
    try:
        root = tomllib.loads(path.read_text()).get("data", {}).get("root")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return Path(str(root)).expanduser().resolve() if root else None


def _isolate_prefect(root: Path | None) -> None:
    """Runs on different data roots at once must not share one Prefect database: unless the user
    names a Prefect API (``PREFECT_API_URL``) or database, this process's temporary Prefect server
    keeps its state in ``DATA_ROOT/viola_work/prefect/prefect.db`` (one run per data root holds it)."""
    if root is None or any(os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")):
        return
    folder = root / "viola_work" / "prefect"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"


STOP_WITHIN_S = 30.0  # a stopped run that cannot end in time (an API it waits for died with it) exits anyway


@contextmanager
def _stops_on_signals(interrupted: threading.Event, record: Path,
                      on_give_up: Callable[[str], None] | None = None) -> Iterator[dict]:
    """SIGTERM (a scheduler's, Kubernetes' or systemd's stop) ends the block as Ctrl-C (SIGINT) does.
    During a flow Prefect's own SIGTERM handler raises its TerminationSignal in the main thread (the
    flow run is marked crashed); outside one, ours raises KeyboardInterrupt. Whichever handler runs,
    the signal also reaches a watcher thread (``signal.set_wakeup_fd``) that sets ``interrupted`` and
    arms a deadline: a run that has not ended ``STOP_WITHIN_S`` later (Prefect retrying an API that died
    with the same signal) stops what it started, by PID, removes ``record`` (the list of them), calls
    ``on_give_up(signal name)`` and exits."""
    from tasks.processes import descendants, stop_processes

    stopped_by: dict = {}

    def give_up(signum: int) -> None:
        stop_processes(descendants(os.getpid()), grace_s=3.0)
        record.unlink(missing_ok=True)
        if on_give_up is not None:
            on_give_up(signal.Signals(signum).name)
        sys.stderr.write(f"error: stopped by {signal.Signals(signum).name}; did not end within "
                         f"{STOP_WITHIN_S:.0f} s, exiting (the same command continues this call)\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def watch(fd: int) -> None:
        while data := os.read(fd, 64):
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT) and "signal" not in stopped_by:
                    stopped_by["signal"] = signum
                    interrupted.set()
                    deadline = threading.Timer(STOP_WITHIN_S, give_up, args=(signum,))
                    deadline.daemon = True  # a run that ends in time is not kept waiting for it
                    deadline.start()

    def on_term(signum, frame) -> None:
        raise KeyboardInterrupt

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch, args=(read_end,), name="watch-signals", daemon=True).start()
    try:
        yield stopped_by
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the watcher reads the end of the pipe and returns


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


_KNOWN = (ValueError, FileNotFoundError, OSError)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="data root to write (INSTANCE 2022 layout)")],
    labelled: Annotated[int, typer.Option(min=0)] = 4,
    unlabelled: Annotated[int, typer.Option(min=0)] = 16,
    test: Annotated[int, typer.Option(min=0)] = 8,
    seed: int = 0,
    size: Annotated[str, typer.Option(help="small (CPU) or full (512 x 512 at ~0.45 mm)")] = "small",
) -> None:
    """Generate synthetic head-CT phantoms with haemorrhage."""
    _setup()
    from data_catalog.phantoms import write_phantom_dataset

    try:
        summary = write_phantom_dataset(out, labelled=labelled, unlabelled=unlabelled, test=test, seed=seed,
                                        size=size)
    except _KNOWN as e:
        _fail(str(e))
    counts = {k: summary[k] for k in ("labelled", "unlabelled", "test") if k in summary}
    typer.echo(f"wrote {counts or summary} to {out}")


@app.command()
def ingest(
    data_root: Path,
    binarize_labels: Annotated[bool, typer.Option(help="map non-zero label values to 1 (0/255, multi-class)")] = False,
) -> None:
    """Register or refresh the catalog of DATA_ROOT (only new or changed files are read).

    Images are NIfTI files or folders holding one DICOM series each (e.g. unlabelled/CASE/*.dcm)."""
    _setup()
    from data_catalog import catalog
    from tasks.progress import progress

    try:
        with progress("ingest", None, logging.getLogger("data_catalog.catalog"), unit="files read") as bar:
            def read(done: int, total: int, path: str) -> None:
                bar.set_total(total)
                bar.update(done, path)

            report = catalog.ingest(data_root, binarize_labels=binarize_labels, on_progress=read)
    except (*_KNOWN, catalog.CatalogBusyError) as e:
        _fail(str(e))
    for line in report.lines():
        typer.echo(line)


@app.command("catalog")
def show_catalog(data_root: Path) -> None:
    """Counts per role, pseudo-label rounds, and rejected files with their reasons."""
    _setup()
    from data_catalog import catalog

    if not data_root.is_dir():
        _fail(f"data root {data_root} does not exist")
    typer.echo(catalog.describe(data_root))


@app.command()
def export(
    data_root: Annotated[Path | None, typer.Argument(help="the data root (nnunet; or with --round, the ensemble of "
                                                      "that round)")] = None,
    out: Annotated[Path, typer.Option(help="folder to write into (nnunet: nnU-Net's nnUNet_raw; otherwise a new "
                                      "folder)")] = ...,
    format_: Annotated[str | None, typer.Option(
        "--format", help="nnunet: an nnU-Net v2 raw dataset; mlflow: a self-contained MLflow model; monai-bundle: "
        "a MONAI bundle (default: nnunet, or mlflow with --model/--checkpoints)")] = None,
    round_: Annotated[int | None, typer.Option("--round", min=0, help="nnunet: whose selected pseudo-labels join "
                                               "the labelled scans (0: the labelled scans alone); mlflow, "
                                               "monai-bundle: whose ensemble")] = None,
    model: Annotated[str | None, typer.Option(help="a registered model, NAME@ALIAS or models:/NAME@ALIAS")] = None,
    checkpoints: Annotated[Path | None, typer.Option(help="an ensemble folder (with ensemble.json)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: ./mlruns/mlflow.db)")] = None,
    dataset_id: Annotated[int, typer.Option(min=1, max=999, help="nnU-Net's dataset id (DatasetNNN_NAME)")] = 501,
    name: str = "ViolaICH",
) -> None:
    """Export for another tool: ``--format nnunet`` writes DATA_ROOT's labelled scans and a round's
    selected pseudo-labels as DatasetNNN_NAME/ (imagesTr, labelsTr, imagesTs, dataset.json);
    ``--format mlflow`` an ensemble (``--model``, ``--checkpoints`` or DATA_ROOT ``--round``) as an
    MLflow model folder with everything inside it (`mlflow models serve -m OUT` with no tracking
    server); ``--format monai-bundle`` the ensemble as a MONAI bundle."""
    _setup()
    format_ = format_ or ("mlflow" if model is not None or checkpoints is not None else "nnunet")
    if format_ not in ("nnunet", "mlflow", "monai-bundle"):
        _fail(f"--format {format_!r}: give nnunet, mlflow or monai-bundle")
    if data_root is not None and not data_root.is_dir():
        _fail(f"data root {data_root} does not exist")
    if format_ == "nnunet":
        _export_nnunet(data_root, out, round_, model, checkpoints, dataset_id, name)
    else:
        _export_ensemble(format_, data_root, out, round_, model, checkpoints, tracking_uri)


def _export_nnunet(data_root: Path | None, out: Path, round_: int | None, model: str | None,
                   checkpoints: Path | None, dataset_id: int, name: str) -> None:
    from data_catalog.nnunet import write_nnunet_dataset

    if model is not None or checkpoints is not None:
        _fail("--format nnunet exports a data root's scans and pseudo-labels: give DATA_ROOT --round R, not "
              "--model or --checkpoints")
    if data_root is None or round_ is None:
        _fail("--format nnunet needs DATA_ROOT and --round R")
    try:
        done = write_nnunet_dataset(data_root, out, round_, dataset_id, name)
    except _KNOWN as e:
        _fail(str(e))
    typer.echo(f"wrote {done['folder']}: {done['labelled']} labelled scan(s), {done['pseudo_labels']} "
               f"pseudo-label(s) of round {round_}, {done['test']} test scan(s)")


def _export_ensemble(format_: str, data_root: Path | None, out: Path, round_: int | None, model: str | None,
                     checkpoints: Path | None, tracking_uri: str | None) -> None:
    import tempfile

    from flows.profiles import WORK_DIR
    from tasks.ensemble_model import export_self_contained
    from tasks.tracking import TrackingUnavailable, resolve_ensemble_dir
    from viola_models.inference.monai_bundle import write_monai_bundle

    if sum(x is not None for x in (model, checkpoints, round_)) != 1 or (round_ is not None and data_root is None):
        _fail(f"--format {format_} exports one ensemble: give --model NAME@ALIAS, --checkpoints FOLDER or "
              "DATA_ROOT --round R")
    if model is not None and not model.startswith(("models:/", "runs:/")):
        model = f"models:/{model}"
    work_dir = data_root / WORK_DIR if data_root is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="viola-export-") as tmp:
            folder = resolve_ensemble_dir(model, round_, checkpoints, work_dir, None, tracking_uri, Path(tmp))
            if format_ == "mlflow":
                export_self_contained(folder, out)
                what = "a self-contained MLflow model (`mlflow models serve -m OUT`, no tracking server needed)"
            else:
                write_monai_bundle(folder, out)
                what = "a MONAI bundle (`python -m monai.bundle run --config_file configs/inference.json`)"
    except (*_KNOWN, TrackingUnavailable, FileExistsError) as e:
        _fail(str(e))
    source = model or (f"round {round_} of {data_root}" if round_ is not None else str(checkpoints))
    typer.echo(f"wrote {out}: {what} of {source}")


def _mark_stopped(work_dir: Path, tracking_uri: str | None, signal_name: str, held: bool = False) -> None:
    """The stopped call's MLflow runs set KILLED, in a thread given a few seconds: a store that
    died with the same signal (a served one) must not hold the exit. ``held``: this process still
    holds the data root (the run did not end in time)."""
    from tasks import tracking
    from tasks.rounds import mark_stopped

    def mark() -> None:
        try:
            n = mark_stopped(work_dir, tracking_uri or tracking.default_tracking_uri(), signal_name, held)
            if n:
                sys.stderr.write(f"{n} MLflow run(s) of this call marked KILLED\n")
        except Exception as e:  # the store is gone: the next call marks them (recover_crashed)
            sys.stderr.write(f"MLflow runs of this call not marked KILLED ({type(e).__name__}); the next call "
                             "marks them\n")

    marker = threading.Thread(target=mark, name="mark-stopped", daemon=True)
    marker.start()
    marker.join(timeout=10)


@app.command()
def run(
    profile: Annotated[str, typer.Option(help="tiny, demo, paper, or the path of a profile .toml")] = "demo",
    data: Annotated[Path | None, typer.Option(help="data root (default: the profile's)")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="how many rounds to run from the next one")] = 1,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: ./mlruns/mlflow.db)")] = None,
    control: Annotated[bool | None, typer.Option(
        "--control/--no-control", help="also run each round's equal-compute control (no pseudo-labels); "
        "default: the profile's [round] control")] = None,
    oracle: Annotated[bool, typer.Option(help="also run each round's oracle: the unlabelled scans with their "
                                              "hidden truth (phantoms only)")] = False,
    force: Annotated[bool, typer.Option(help="run a round even when nothing changed since the last one")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="change a profile setting for this call, e.g. --set student.init=scratch")] = None,
    resume: Annotated[bool, typer.Option(help="finish the interrupted call on this data root as it was asked")] = False,
    abandon: Annotated[bool, typer.Option(help="leave the interrupted call on this data root; run this one")] = False,
) -> None:
    """Run the next self-training round(s) in this process (Prefect's ephemeral API, no server).

    After an interrupted call, the same command continues it; a different one is refused until it
    says --resume (finish the interrupted call as it was) or --abandon (run this one instead)."""
    _isolate_prefect(_profile_root(profile, data, set_))
    _setup(flows=True)
    call = _RunCall(profile, data, rounds, tracking_uri, control, oracle, force, resume, abandon)
    settings, overrides, held = _claim_root(call, set_ or [])
    results = _run_rounds(call, settings, overrides, held)
    for res in results:
        typer.echo(res["summary"])
    from flows.self_training import compare_arms

    if comparison := compare_arms(results):
        typer.echo(comparison)


@dataclass(frozen=True)
class _RunCall:
    """The options of one `viola run`."""

    profile: str
    data: Path | None
    rounds: int
    tracking_uri: str | None
    control: bool | None
    oracle: bool
    force: bool
    resume: bool
    abandon: bool


def _claim_root(call: _RunCall, set_: list[str]):
    """Everything that can fail fast, in one line, before Prefect starts: the profile and its
    overrides, the data root, the stores' reach, the data root's lock (held until the process
    exits: the flow takes the same lock again), what a killed run left, and whether this call may
    run after an interrupted one. Returns (settings, overrides, the held lock's stack)."""
    from data_catalog.catalog import discover
    from flows.profiles import ProfileError, load_profile, parse_overrides
    from tasks.compute import ClusterError, check_reachable
    from tasks.processes import stop_leftovers
    from tasks.rounds import CallConflict, RunBusyError, decide_call, exclusive, requested_call
    from tasks.tracking import default_tracking_uri

    held = ExitStack()
    try:
        overrides = parse_overrides(set_)
        settings = load_profile(call.profile, call.data, overrides)
        user_root = call.data is not None or settings.data.synth is None
        if user_root:  # a user's data root must hold scans; only the demo's is filled with phantoms
            discover(settings.data.root)
        check_reachable(settings.compute, call.tracking_uri or default_tracking_uri(create=False),
                        os.environ.get("PREFECT_API_URL"))
        held.enter_context(exclusive(settings.work_dir, create_root=not user_root))
        if left := stop_leftovers(settings.work_dir):  # what a run killed with -9 left running
            typer.echo(left, err=True)
        control = settings.round.control if call.control is None else call.control
        decide_call(settings.work_dir, requested_call(call.profile, call.rounds, control, call.oracle, call.force,
                                                      overrides), call.resume, call.abandon)
    except (ProfileError, FileNotFoundError, RunBusyError, ClusterError, CallConflict) as e:
        held.close()
        _fail(str(e))
    return settings, overrides, held


def _run_rounds(call: _RunCall, settings, overrides: dict, held: ExitStack) -> list[dict]:
    """The self-training flow in this process, stopped cleanly by SIGINT or SIGTERM: the flow run and
    the MLflow runs marked, every child stopped, the data root freed, exit 128 + the signal."""
    from prefect.exceptions import TerminationSignal

    from flows.self_training import self_training
    from tasks.compute import ClusterError
    from tasks.processes import RECORD, recorded_children
    from tasks.rounds import RunBusyError
    from tasks.tracking import TrackingUnavailable

    stopped, work = 0, settings.work_dir
    with held:
        interrupted = held.enter_context(recorded_children(work))
        try:
            with _stops_on_signals(interrupted, work / RECORD,
                                   lambda name: _mark_stopped(work, call.tracking_uri, name, held=True)) as stopped_by:
                results = self_training(profile=call.profile, data_root=str(call.data) if call.data else None,
                                        rounds=call.rounds, tracking_uri=call.tracking_uri, control=call.control,
                                        oracle=call.oracle, force=call.force, overrides=overrides or None,
                                        resume=call.resume, abandon=call.abandon)
        except (*_KNOWN, RunBusyError, TrackingUnavailable, ClusterError) as e:
            _fail(str(e), code=1)
        except (KeyboardInterrupt, TerminationSignal):
            interrupted.set()  # leaving the block stops what the run started and frees the data root
            stopped = stopped_by.get("signal", signal.SIGINT)
    if stopped:  # exit now: worker threads still training must not hold the process
        _mark_stopped(work, call.tracking_uri, signal.Signals(stopped).name)
        sys.stdout.flush()
        sys.stderr.write(f"error: stopped by {signal.Signals(stopped).name}; the same command continues this call\n")
        sys.stderr.flush()
        os._exit(128 + stopped)
    return results


@app.command()
def serve(
    profile: Annotated[str, typer.Option(help="tiny, demo, paper, or the path of a profile .toml")] = "demo",
    data: Annotated[Path | None, typer.Option(help="data root (default: the profile's)")] = None,
    cron: Annotated[str | None, typer.Option(help="schedule of rounds (default: the profile's)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: ./mlruns/mlflow.db)")] = None,
) -> None:
    """Serve the deployments self-training/round and watch-unlabelled/watch (needs a Prefect server)."""
    _setup(flows=True)
    from flows.profiles import ProfileError, load_profile

    try:
        load_profile(profile, data)
    except ProfileError as e:
        _fail(str(e))
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            _fail("serving needs a Prefect server: start one (`prefect server start --host 127.0.0.1`) and set "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from flows.serve import serve_deployments

    serve_deployments(profile, str(data) if data else None, cron, tracking_uri)


@app.command()
def predict(
    input: Annotated[Path, typer.Argument(
        help="a folder of NIfTI scans and/or DICOM series folders, one NIfTI scan, or one DICOM series folder")],
    output: Annotated[Path, typer.Argument(help="folder for the masks and predictions_info.csv")],
    model: Annotated[str | None, typer.Option(help="MLflow model URI, e.g. models:/NAME@champion")] = None,
    round: Annotated[int | None, typer.Option("--round", help="a round of the profile's data root")] = None,
    checkpoints: Annotated[Path | None, typer.Option(help="a folder with ensemble.json or */best.pt")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto")] = "auto",
    tta: Annotated[bool, typer.Option(help="flip test-time augmentation (4x slower)")] = False,
    overlays: Annotated[bool, typer.Option(help="PNG overlays on the three-window view")] = False,
    dicom_seg: Annotated[bool, typer.Option(
        help="also a DICOM SEG per DICOM series (FOLDER.seg.dcm, referencing it; needs highdicom)")] = False,
    overlap: Annotated[float, typer.Option(min=0.0, max=0.9, help="sliding-window overlap")] = 0.5,
    backend: Annotated[str | None, typer.Option(
        help="CPU backend: auto (OpenVINO when installed), torch or openvino (default: the profile's [inference])")
    ] = None,
    precision: Annotated[str | None, typer.Option(
        help="CPU precision: auto (int8 for a model whose int8 check passed at registration, else bf16 where "
             "the CPU has it natively), fp32, bf16 or int8 (default: the profile's)")
    ] = None,
    profile: Annotated[str, typer.Option(help="profile whose registry model / data root to use")] = "demo",
    data: Annotated[Path | None, typer.Option(help="data root for --round (default: the profile's)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: ./mlruns/mlflow.db)")] = None,
    allow_rejected: Annotated[bool, typer.Option(
        help="exit 0 even when inputs were rejected (batch use); the table lists them either way")] = False,
) -> None:
    """Segment scans with a trained ensemble (default: the champion of the local registry).

    Exits 1 when any input was rejected (unless --allow-rejected), 2 on a usage or model error."""
    _setup()
    import time

    from viola_models.inference.segment import predict_folder

    if dicom_seg:
        from data_catalog.dicom import check_seg_writer

        try:
            check_seg_writer()
        except RuntimeError as e:
            _fail(f"--dicom-seg: {e}")
    ensemble = _load_model(_ModelChoice(model, round, checkpoints, profile, data, tracking_uri, device, backend,
                                        precision))
    t0 = time.perf_counter()
    from tasks.progress import progress

    try:
        with progress("segment", None, unit="scans") as bar:  # a bar in a terminal; the lines below always
            table = predict_folder(input, output, ensemble, overlap=overlap, tta=tta, overlays=overlays,
                                   on_scan=_scan_lines(bar), dicom_seg=dicom_seg)
    except _KNOWN as e:
        _fail(str(e))
    ok = int((table.status == "ok").sum())
    typer.echo(f"segmented {ok} of {len(table)} input(s) ({len(table) - ok} rejected) in "
               f"{time.perf_counter() - t0:.1f} s; masks and predictions_info.csv in {output}")
    if ok < len(table) and not allow_rejected:
        raise typer.Exit(1)


@dataclass(frozen=True)
class _ModelChoice:
    """Which ensemble `viola predict` uses (at most one of model, round, checkpoints; none: the
    profile's registry champion) and how it runs it."""

    model: str | None
    round: int | None
    checkpoints: Path | None
    profile: str
    data: Path | None
    tracking_uri: str | None
    device: str
    backend: str | None
    precision: str | None


def _load_model(choice: _ModelChoice):
    """The chosen ensemble, loaded for its device and CPU backend, with one line saying which; a
    usage or model error exits 2 in one line."""
    import tempfile

    import torch
    from pydantic import ValidationError

    from flows.profiles import ProfileError, load_profile
    from tasks.tracking import TrackingUnavailable, resolve_ensemble_dir
    from viola_models.inference.backends import resolve_backend
    from viola_models.inference.ensemble import load_ensemble
    from viola_models.inference.predictors import resolve_device

    try:
        device = str(resolve_device(choice.device))
        settings = load_profile(choice.profile, choice.data)
        changes = {k: v for k, v in (("backend", choice.backend), ("precision", choice.precision)) if v is not None}
        try:
            inference = settings.inference.model_validate(settings.inference.model_dump() | changes)
            chosen = resolve_backend(inference, torch.device(device))
        except ValidationError as e:
            _fail(f"--{e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
        with tempfile.TemporaryDirectory(prefix="viola-model-") as tmp:  # a registry download, removed after loading
            folder = resolve_ensemble_dir(choice.model, choice.round, choice.checkpoints, settings.work_dir,
                                          settings.tracking.registered_model, choice.tracking_uri, Path(tmp))
            ensemble = load_ensemble(folder, device=device, inference=inference)
    except (*_KNOWN, ProfileError, TrackingUnavailable) as e:
        _fail(str(e))
    source = choice.checkpoints or (f"round {choice.round}" if choice.round is not None else choice.model or
                                    f"models:/{settings.tracking.registered_model}@champion")
    ran = getattr(ensemble.predictors[0], "precision", chosen[1]) if ensemble.predictors else chosen[1]
    how = f" ({chosen[0]}, {ran})" if device == "cpu" else ""
    typer.echo(f"ensemble: {len(ensemble.members)} member(s) from {source} on {device}{how}")
    return ensemble


def _scan_lines(bar) -> Callable[[int, int, dict], None]:
    """The per-scan callback of `viola predict`: the bar moves, and one line per scan says what it found."""
    from tasks.progress import format_seconds

    def report(i: int, n: int, row: dict) -> None:
        bar.set_total(n)
        bar.update(i, row["file_name"])
        left = bar.remaining_s()
        left = f"; about {format_seconds(left)} left" if left and left >= 1 and i < n else ""
        if row["status"] == "ok":
            typer.echo(f"[{i}/{n}] {row['file_name']}: {row['predicted_volume_ml']} ml in "
                       f"{row['n_lesions']} lesion(s), agreement {row['agreement']}, predicted Dice "
                       f"{row['predicted_dice']}, {row['inference_seconds']} s{left}")
        else:
            typer.echo(f"[{i}/{n}] {row['file_name']}: rejected: {row['reason']}{left}")

    return report


@app.command("import-reference")
def import_reference(
    checkpoints: Annotated[list[Path], typer.Argument(help="the authors' checkpoint files (.pt/.pth state_dicts)")],
    out: Annotated[Path, typer.Option(help="new ensemble folder to write")],
    config: Annotated[str | None, typer.Option(
        help="configuration of every file: a name (viola_l, viola_s, nnunet_r, ...) or the authors' constructor "
             "arguments as JSON (default: what the file carries, else detected from the weights)")] = None,
    patch_size: Annotated[tuple[int, int, int], typer.Option(
        help="sliding-window size the members predict with (the authors': 160 160 32)")] = (160, 160, 32),
    profile: Annotated[str | None, typer.Option(
        help="take the preprocessing from this profile's [preprocess] (default: the authors' final one: "
             "0.902 x 0.902 x 4.997 mm, windows [0,100] [-15,200] [-100,1300] HU)")] = None,
) -> None:
    """Turn the authors' published checkpoints into an ensemble folder for `viola predict --checkpoints`
    and for a round 0 that starts from them (`[members] init` in a profile)."""
    _setup()
    from flows.profiles import ProfileError, load_profile
    from viola_models.inference.ensemble import read_manifest
    from viola_models.nets.reference import import_reference_checkpoints

    try:
        preprocess = load_profile(profile).preprocess if profile else None
        manifest = import_reference_checkpoints(checkpoints, out, config=config, patch_size=patch_size,
                                                preprocess=preprocess)
        members = read_manifest(manifest.parent)["members"]
    except (*_KNOWN, ProfileError) as e:
        _fail(str(e))
    for m in members:
        typer.echo(f"{m['source']} -> {m['name']} ({m['architecture']})")
    typer.echo(f"wrote an ensemble of {len(members)} member(s) to {out}; use it with `viola predict --checkpoints "
               f"{out}` or `[members] init = \"{out}\"` in a profile")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
