"""The watcher flow: ingest the data root and announce newly arrived unlabelled scans as an event
(``viola.unlabelled.arrived``) that triggers the round deployment."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from data_catalog import catalog
from flows.profiles import load_profile

NEW_SCANS_EVENT = "viola.unlabelled.arrived"


@task(name="ingest")
def ingest_root(root: str, binarize_labels: bool) -> list[str]:
    """Incremental ingest; returns the ids of new usable unlabelled scans."""
    report = catalog.ingest(root, binarize_labels=binarize_labels)
    usable = catalog.usable_scans(root, "unlabelled")
    return sorted(set(report.new) & set(usable.scan_id))


@flow(name="watch-unlabelled")
def watch_unlabelled(profile: str = "demo", data_root: str | None = None) -> list[str]:
    """Look for new unlabelled scans; emit one event naming them when there are any."""
    settings = load_profile(profile, data_root)
    new = ingest_root(str(settings.data.root), settings.data.binarize_labels)
    logger = get_run_logger()
    if new:
        emit_event(event=NEW_SCANS_EVENT,
                   resource={"prefect.resource.id": f"viola.data-root.{settings.data.root}"},
                   payload={"scan_ids": new, "data_root": str(settings.data.root), "profile": profile})
        logger.info("%d new unlabelled scan(s): %s", len(new), ", ".join(new[:10]))
    else:
        logger.info("no new unlabelled scans in %s", settings.data.root)
    return new
