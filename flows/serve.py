"""Serving: the round deployment on a cron schedule and on the new-scans event, one at a time
(a second round queues behind the first), plus the watcher deployment."""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from flows.profiles import load_profile
from flows.self_training import self_training
from flows.watch import NEW_SCANS_EVENT, watch_unlabelled
from tasks.rounds import crash_abandoned_runs


def build_deployments(profile: str, data_root: str | None, cron: str | None = None,
                      tracking_uri: str | None = None) -> list:
    """The two deployments with their default parameters taken from the options of `viola serve`."""
    settings = load_profile(profile, data_root)
    root = str(settings.data.root)
    params = {"profile": profile, "data_root": root, "rounds": 1, "tracking_uri": tracking_uri}
    trigger = DeploymentEventTrigger(
        name="new unlabelled scans",
        expect={NEW_SCANS_EVENT},
        match={"prefect.resource.id": f"viola.data-root.{root}"},
        parameters={"profile": profile, "data_root": root, "rounds": 1, "tracking_uri": tracking_uri},
    )
    round_dep = self_training.to_deployment(
        name="round",
        cron=cron or settings.schedule.cron,
        triggers=[trigger],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters=params,
        description=f"The next self-training round of {root} (profile {profile}).",
        tags=["viola", settings.name],
    )
    watch_dep = watch_unlabelled.to_deployment(
        name="watch",
        interval=settings.schedule.watch_interval_s,
        parameters={"profile": profile, "data_root": root},
        description=f"Ingest {root} and announce new unlabelled scans.",
        tags=["viola", settings.name],
    )
    return [round_dep, watch_dep]


def serve_deployments(profile: str, data_root: str | None, cron: str | None = None,
                      tracking_uri: str | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); first free what a killed server left running."""
    settings = load_profile(profile, data_root)
    crash_abandoned_runs(settings.work_dir, "self-training/round", str(settings.data.root))
    serve(*build_deployments(profile, data_root, cron, tracking_uri))
