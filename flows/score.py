"""Score flow: a registered model run over every record of a store, into a float16 activation store.

With `sharded` (a Dask task runner: `ecgproto score STORE --dask local:4` or `--dask
tcp://scheduler:8786`) each shard (a run of the store's rows) is a Prefect task spread over the
cluster; otherwise the shards are scored on this machine (on a CPU one single-threaded process per
core). The activation store is the same either way. One MLflow run `score` holds the plan, the
counts and the rate; nothing identifying (record ids stay in the local activation store).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.store import ArrayStore
from ecgproto.data.summary import store_dataset
from ecgproto.phenotype.features import prototype_table
from ecgproto.scoring import ScoringPlan, local_processes, score_shard, score_shards_here, score_store, scoring_report
from ecgproto.settings import DEFAULT_MODEL_URI
from ecgproto.settings import store_root as default_store_root
from ecgproto.train.stages import resolve_device

DEFAULT_MODEL = DEFAULT_MODEL_URI


@task(name="score-shard", retries=2, retry_delay_seconds=1)
def score_shard_task(plan: ScoringPlan, index: int, device: str, loader_workers: int) -> int:
    """One shard, on whichever worker the flow's task runner picks; a retry re-scores only this shard."""
    return score_shard(plan, index, device=device, workers=loader_workers)


@flow(name="score", log_prints=True)
def score_flow(
    store: str,
    model_uri: str = DEFAULT_MODEL,
    out: str | None = None,
    shard_size: int = 65_536,
    batch_size: int = 256,
    device: str = "auto",
    loader_workers: int = 0,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    sharded: bool = False,
    processes: int = 0,
) -> dict[str, object]:
    """Write (or find) the activation store of `model_uri` on `store`; returns its path and the MLflow run id.

    `sharded`: each shard is a task of the flow's task runner (a Dask cluster); otherwise the shards are scored
    here, on a CPU by `processes` single-threaded processes (0: one per core)."""
    s = ArrayStore.open(store)
    lineage = tracking.model_lineage(model_uri, tracking_uri)
    dev = str(resolve_device(device))
    with tracking.stage_run(
        "score",
        parent_run_id=parent_run_id,
        uri=tracking_uri,
        error_detail=False,
        tags={"prefect_flow_run_id": str(flow_run.id), "cohort_dataset_hash": s.key},
        system_metrics=True,
    ) as run_id:
        model = tracking.load_model(lineage["model_uri"], tracking_uri)
        shards: list[int] = []

        def run_shards(plan: ScoringPlan, pending: list[int]) -> None:
            shards.extend(pending)
            if sharded:
                score_shard_task.map(unmapped(plan), pending, unmapped(dev), unmapped(loader_workers)).result()
            else:
                score_shards_here(plan, pending, device=dev, workers=loader_workers, processes=processes, model=model)

        t0 = time.perf_counter()
        acts = score_store(
            s,
            model,
            Path(out) if out else default_store_root(),
            prototype_table(model),
            shard_size=shard_size,
            batch_size=batch_size,
            device=dev,
            run_shards=run_shards,
        )
        seconds = time.perf_counter() - t0
        info = acts.info
        report = scoring_report(
            acts,
            seconds,
            len(shards),
            lineage,
            {
                "model_uri": model_uri,
                "shard_size": shard_size,
                "batch_size": batch_size,
                "device": dev,
                "loader_workers": loader_workers,
                "processes": "cluster" if sharded else local_processes(dev, len(shards), processes),
            },
        )
        report.datasets.append(store_dataset(s, "cohort"))
        rate = f" at {info['n'] / seconds:,.0f} ECGs/s" if shards else " (a cache hit: already scored)"
        report.description = (
            f"**Scoring** of {lineage.get('model_uri', model_uri)} on the store `{s.key[:16]}`: {info['n']:,} ECGs x "
            f"{info['n_prototypes']} prototypes{rate}, into the float16 activation store `{info['key'][:16]}` that "
            "`ecgproto associate --activations` reads. No record identifiers are logged."
        )
        tracking.log_report(run_id, report, tracking_uri)
    print(
        f"score {'cache hit' if not shards else f'done ({len(shards)} shards)'}: {info['n']:,} ECGs x "
        f"{info['n_prototypes']} prototypes -> {acts.path}"
    )
    return {"activations": str(acts.path), "run_id": run_id, "n": info["n"]}
