"""Ingest flow: a dataset folder -> cached array store, logged as one MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.ingest import IngestChunk, IngestConfig, ingest, ingest_chunk
from ecgproto.data.layouts import check_root
from ecgproto.data.store import ArrayStore
from ecgproto.data.summary import ingest_report
from ecgproto.settings import store_root as default_store_root


@task(name="build-store", retries=1, retry_delay_seconds=1)
def build_store(root: str, store_root: str, config: IngestConfig) -> tuple[str, bool, float]:
    """Returns (store path, cache hit, seconds). A retry resumes from the finished chunks."""
    result = ingest(root, store_root, config)
    return str(result.store.path), result.cache_hit, result.seconds


@task(name="ingest-chunk", retries=2, retry_delay_seconds=1)
def ingest_chunk_task(chunk: IngestChunk) -> int:
    """One chunk of records, on whichever worker the flow's task runner picks."""
    return ingest_chunk(chunk)


def build_store_sharded(root: str, store_root: str, config: IngestConfig) -> tuple[str, bool, float]:
    """As build_store, with every chunk a task of this flow's task runner (e.g. a Dask cluster)."""

    def run_chunks(chunks: list[IngestChunk]) -> None:
        ingest_chunk_task.map(chunks).result()

    result = ingest(root, store_root, config, run_chunks=run_chunks, progress=False)
    return str(result.store.path), result.cache_hit, result.seconds


@task(name="log-ingest-run")
def log_ingest_run(
    run_id: str, store_path: str, cache_hit: bool, seconds: float, config: IngestConfig, uri: str | None
) -> None:
    store = ArrayStore.open(store_path)
    tracking.log_report(
        run_id, ingest_report(store, cache_hit=cache_hit, seconds=seconds, config=config.model_dump()), uri
    )


@flow(name="ingest", log_prints=True)
def ingest_flow(
    root: str,
    config: IngestConfig | None = None,
    store_root: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    sharded: bool = False,
) -> dict[str, str]:
    """Ingest a PTB-XL or MIMIC-IV-ECG folder; returns the store path and the MLflow run id.

    sharded: each chunk of records is a task of this flow's task runner; run it as
    `ingest_flow.with_options(task_runner=ecgproto.flows.scale.runner("local:4"))(..., sharded=True)`."""
    config = config or IngestConfig()
    check_root(Path(root), config.layout)  # a wrong path fails here, before it leaves an empty FAILED run
    # MIMIC-IV-ECG record paths name a subject: a failed ingest keeps only the error's type on its run
    with tracking.stage_run(
        "ingest",
        run_name=f"ingest {Path(root).name}",
        parent_run_id=parent_run_id,
        tags={"prefect_flow_run_id": str(flow_run.id)},
        uri=tracking_uri,
        error_detail=False,
    ) as run_id:
        build = build_store_sharded if sharded else build_store
        path, hit, seconds = build(root, store_root or str(default_store_root()), config)
        log_ingest_run(run_id, path, hit, seconds, config, tracking_uri)
    store = ArrayStore.open(path)
    print(
        f"ingest {'cache hit' if hit else 'done'}: {store.info['n_records']} records, "
        f"{store.info['n_quarantined']} quarantined -> {path}"
    )
    if unmatched := store.info.get("n_unmatched_label_rows", 0):
        examples = ", ".join(store.info.get("unmatched_label_examples", []))
        print(
            f"ingest: {unmatched} row(s) of the labels file name no record below {Path(root).name}"
            + (f" (e.g. {examples})" if examples else "")
            + "; check their record names (paths relative to the folder, without extension)"
        )
    return {"store": path, "run_id": run_id, "dataset_hash": store.key}
