"""Ingest flow: a dataset folder -> cached array store, logged as one MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.store import ArrayStore
from ecgproto.data.summary import ingest_report
from ecgproto.settings import store_root as default_store_root


@task(name="build-store", retries=1, retry_delay_seconds=1)
def build_store(root: str, store_root: str, config: IngestConfig) -> tuple[str, bool, float]:
    """Returns (store path, cache hit, seconds). A retry resumes from the finished chunks."""
    result = ingest(root, store_root, config)
    return str(result.store.path), result.cache_hit, result.seconds


@task(name="log-ingest-run")
def log_ingest_run(run_id: str, store_path: str, cache_hit: bool, seconds: float, config: IngestConfig,
                   uri: str | None) -> None:
    store = ArrayStore.open(store_path)
    tracking.log_report(run_id, ingest_report(store, cache_hit=cache_hit, seconds=seconds,
                                              config=config.model_dump()), uri)


@flow(name="ingest", log_prints=True)
def ingest_flow(root: str, config: IngestConfig | None = None, store_root: str | None = None,
                tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict[str, str]:
    """Ingest a PTB-XL or MIMIC-IV-ECG folder; returns the store path and the MLflow run id."""
    config = config or IngestConfig()
    run_id = tracking.start_run("ingest", run_name=f"ingest {Path(root).name}", parent_run_id=parent_run_id,
                                tags={"prefect_flow_run_id": str(flow_run.id)}, uri=tracking_uri)
    try:
        path, hit, seconds = build_store(root, store_root or str(default_store_root()), config)
        log_ingest_run(run_id, path, hit, seconds, config, tracking_uri)
    except BaseException:
        tracking.end_run(run_id, "FAILED", tracking_uri)
        raise
    tracking.end_run(run_id, uri=tracking_uri)
    store = ArrayStore.open(path)
    print(f"ingest {'cache hit' if hit else 'done'}: {store.info['n_records']} records, "
          f"{store.info['n_quarantined']} quarantined -> {path}")
    return {"store": path, "run_id": run_id, "dataset_hash": store.key}
