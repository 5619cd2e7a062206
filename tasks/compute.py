"""Where the members of a round run: Prefect's task runners, chosen by the profile's ``[compute]``.

``sequential``: one member after another in this process (Prefect's thread pool with one worker).
``ray``: prefect-ray's ``RayTaskRunner``; every member is submitted at once with its Ray resources
(``num_gpus`` isolates the devices: each task sees only its own ``CUDA_VISIBLE_DEVICES``), and Ray
queues what does not fit. Ray workers are other processes, possibly on other machines: they reach
the data root and the work folder by the same paths (a shared filesystem), the Prefect API named
by ``PREFECT_API_URL`` (this process's own temporary API on a local Ray) and MLflow by the
tracking URI the round passes them (see ``tasks.tracking.shared_tracking``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from typing import Literal
from urllib.parse import urlparse

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.progress import LEVEL_ENV, PROJECT_LOGGERS

__all__ = ["ClusterError", "ComputeSettings", "check_cluster", "check_reachable", "cluster", "member_options",
           "task_runner", "worker_device"]

log = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")


_RAY_ADDRESS = re.compile(r"^(auto|ray://[A-Za-z0-9.\-\[\]:]+:\d{1,5})$")


class ComputeSettings(BaseModel):
    """Where a round's members train (see README, "Rounds on several GPUs or machines").

    ``runner``: ``sequential`` trains the members one after another in this process (the default:
    on a CPU-only machine two torch processes only share the same cores); ``ray`` submits every
    member at once as a Prefect task on Ray (prefect-ray), each on its own share of the cluster.
    ``address``: empty starts a local Ray on this machine's GPUs and cores; ``auto`` joins the
    cluster this machine belongs to; ``ray://HOST:PORT`` a remote one. ``gpus_per_member`` (a
    fraction packs several members on one GPU; above 1 a whole number), ``cpus_per_member`` and
    ``torch_threads`` (torch's intra-op threads in each member; empty: torch's default) size each
    member; ``retries``: how often a failed or killed member is run again (it resumes from its
    ``last.pt``).
    """

    model_config = ConfigDict(extra="forbid")
    runner: Literal["sequential", "ray"] = "sequential"
    address: str = ""
    gpus_per_member: float = Field(0.0, ge=0)
    cpus_per_member: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    retries: int = Field(2, ge=0, le=20)

    @model_validator(mode="after")
    def _check(self) -> ComputeSettings:
        if self.address and not _RAY_ADDRESS.match(self.address):
            raise ValueError(f"address {self.address!r}: expected empty (a local Ray), 'auto' or 'ray://HOST:PORT'")
        if self.runner == "sequential" and self.address:
            raise ValueError(f"address {self.address!r} needs runner = 'ray' (the sequential runner uses no cluster)")
        if self.runner == "sequential" and self.gpus_per_member not in (0.0, 1.0):
            raise ValueError("gpus_per_member is a Ray setting: the sequential runner trains one member at a time "
                             "on the profile's device (use runner = 'ray' to pack members on a GPU)")
        if self.gpus_per_member > 1 and not float(self.gpus_per_member).is_integer():
            raise ValueError(f"gpus_per_member = {self.gpus_per_member}: above 1 it must be a whole number of GPUs")
        return self


class ClusterError(RuntimeError):
    """A Ray set-up that cannot run the round (one-line reason)."""


def _prefect_api_url() -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/") or None


def task_runner(compute: ComputeSettings, tracking_uri: str) -> TaskRunner:
    """The task runner of a round's member fan-out. A remote cluster (``ray://``) is refused with
    a one-line reason when its workers could not reach this round's Prefect API or MLflow store."""
    if compute.runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ClusterError("compute.runner = 'ray' needs prefect-ray: pip install 'viola-ich[cluster]'") from None
    return RayTaskRunner(address=compute.address or None, init_kwargs=_ray_init_kwargs(_reachable(compute,
                                                                                               tracking_uri)))


def _reachable(compute: ComputeSettings, tracking_uri: str) -> str | None:
    """This run's Prefect API URL, after refusing a remote cluster whose workers could not reach it
    or the MLflow store (the store first: it needs no Prefect API to tell)."""
    _check_tracking(compute, tracking_uri)
    api = _prefect_api_url()
    check_reachable(compute, tracking_uri, api)
    return api


def _check_tracking(compute: ComputeSettings, tracking_uri: str) -> None:
    if compute.address.startswith("ray://") and not tracking_uri.startswith(("http://", "https://")):
        raise ClusterError(f"a remote Ray cluster ({compute.address}) cannot write to {tracking_uri}: run "
                           "`mlflow server` (README) and give its http:// address as the tracking URI")


def check_reachable(compute: ComputeSettings, tracking_uri: str, api_url: str | None) -> None:
    """A remote Ray cluster (``ray://``) needs a tracking server and a Prefect API that its
    workers can reach: else a ClusterError with one line (also checked before Prefect starts)."""
    _check_tracking(compute, tracking_uri)
    if compute.address.startswith("ray://") and (urlparse(api_url or "").hostname or "") in _LOOPBACK:
        raise ClusterError(f"a remote Ray cluster ({compute.address}) cannot reach this machine's own Prefect "
                           f"API ({api_url or 'a temporary one'}): start a Prefect server and set PREFECT_API_URL "
                           "to its address")


# Ray folds lines that differ only in their numbers into one "[repeated 5x across cluster]": a
# member's steps and a share's scans are exactly such lines, and each must reach the terminal
_RAY_ENV = {"RAY_DEDUP_LOGS_ALLOW_REGEX": r"step \d+|\d+/\d+ scans"}


def _ray_init_kwargs(api: str | None) -> dict:
    # the workers report their task runs to this run's Prefect API, not to one of their own, and
    # log at the driver's level: their lines (a member's steps and time left) are forwarded to it
    level = logging.getLevelName(logging.getLogger(PROJECT_LOGGERS[0]).getEffectiveLevel())
    env = {LEVEL_ENV: level, **({"PREFECT_API_URL": api} if api else {})}
    return {"include_dashboard": False, "log_to_driver": True, "namespace": "prefect",
            "runtime_env": {"env_vars": env, "worker_process_setup_hook": "tasks.progress.worker_logging"}}


@contextlib.contextmanager
def cluster(compute: ComputeSettings, tracking_uri: str) -> Iterator[None]:
    """One Ray for a whole call (``runner = "ray"``): started or joined here, shut down at the end.
    The fan-outs of every round reuse it instead of starting Ray each time (about 15 s each on
    2 cores). Nothing for the sequential runner."""
    if compute.runner != "ray":
        yield
        return
    for key, value in _RAY_ENV.items():  # read when ray is first imported
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise ClusterError("compute.runner = 'ray' needs prefect-ray: pip install 'viola-ich[cluster]'") from None
    if ray.is_initialized():
        yield
        return
    ray.init(compute.address or None, **_ray_init_kwargs(_reachable(compute, tracking_uri)))
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def member_options(compute: ComputeSettings) -> Iterator[None]:
    """The Ray resources of every member submitted inside this block (nothing for ``sequential``);
    Ray itself runs a member again, up to ``retries`` times, when its worker process dies."""
    if compute.runner != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=compute.gpus_per_member, num_cpus=compute.cpus_per_member,
                        max_retries=compute.retries):
        yield


def worker_device(device: str, threads: int | None) -> str:
    """In the process that runs a task (a Ray worker, or this one): torch's intra-op threads set to
    ``threads`` (None: left as they are) and ``device`` resolved here (``auto``: the GPU Ray gave
    this worker, if any)."""
    import torch

    from viola_models.inference.predictors import resolve_device

    if threads:
        torch.set_num_threads(threads)
    return str(resolve_device(device))


def check_cluster(compute: ComputeSettings) -> dict:
    """Inside a Ray task runner: the cluster's resources, refused when one member could never be
    placed (more GPUs or CPUs per member than any node has: it would wait forever)."""
    if compute.runner != "ray":
        return {"host": socket.gethostname()}
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if compute.gpus_per_member > gpus:
        raise ClusterError(f"compute.gpus_per_member = {compute.gpus_per_member} but the largest Ray node has "
                           f"{gpus:g} GPU(s): no member could start")
    if compute.cpus_per_member > cpus:
        raise ClusterError(f"compute.cpus_per_member = {compute.cpus_per_member} but the largest Ray node has "
                           f"{cpus:g} CPU(s): no member could start")
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    per_member = compute.gpus_per_member or compute.cpus_per_member
    slots = int(total["GPU" if compute.gpus_per_member else "CPU"] // per_member)
    log.info("Ray: %d node(s), %g CPU, %g GPU: %d member(s) at a time", len(nodes), total["CPU"], total["GPU"],
             slots)
    return {"nodes": len(nodes), **total, "slots": slots}
