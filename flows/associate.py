"""Association flow: a registered model scored on an external cohort, prototypes vs discharge phecodes.

One MLflow run holds the study's params (config and lineage: model version, training run, dataset
hash), the result table (parquet + TSV), the comparisons and the figures; credentialed-data rules
are applied before anything is logged.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.store import ArrayStore
from ecgproto.phenotype.study import PhenotypeStudy, StudyConfig, StudyResult, study_report

DEFAULT_MODEL = "models:/ecgproto-protoecgnet/latest"


@task(name="run-study")
def run_study(cohort_store: str, hosp: str, model_uri: str | None, machine_measurements: str | None,
              config: StudyConfig, uri: str | None) -> StudyResult:
    model = tracking.load_model(model_uri, uri) if model_uri else None
    return PhenotypeStudy(config).run(ArrayStore.open(cohort_store), Path(hosp), model,
                                      Path(machine_measurements) if machine_measurements else None)


@task(name="log-association")
def log_association(run_id: str, result: StudyResult, config: StudyConfig, lineage: dict[str, str],
                    uri: str | None) -> dict[str, float]:
    report = study_report(result, config, lineage)
    tracking.log_report(run_id, report, uri)
    return report.metrics


@flow(name="associate", log_prints=True)
def associate_flow(cohort_store: str, hosp: str, model_uri: str | None = DEFAULT_MODEL,
                   machine_measurements: str | None = None, config: StudyConfig | None = None,
                   tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict[str, object]:
    """Run the study; returns the MLflow run id, the headline metrics and the result table's artifact path."""
    config = config or StudyConfig()
    lineage = tracking.model_lineage(model_uri, tracking_uri) if model_uri else {}
    store = ArrayStore.open(cohort_store)
    lineage["cohort_dataset_hash"] = store.key
    run_id = tracking.start_run("associate", parent_run_id=parent_run_id, uri=tracking_uri,
                                tags={"prefect_flow_run_id": str(flow_run.id), "cohort_dataset_hash": store.key})
    try:
        result = run_study(cohort_store, hosp, model_uri, machine_measurements, config, tracking_uri)
        metrics = log_association(run_id, result, config, lineage, tracking_uri)
    except BaseException:
        tracking.end_run(run_id, "FAILED", tracking_uri)
        raise
    tracking.end_run(run_id, uri=tracking_uri)
    significant = {k: v for k, v in metrics.items() if k.endswith(".significant_bonf")}
    print(f"association: {int(metrics['phecodes_tested'])} phecodes tested; Bonferroni-significant pairs "
          + ", ".join(f"{k.split('.')[0]} {int(v)}" for k, v in significant.items()))
    return {"run_id": run_id, "metrics": metrics, "results": "association/results.parquet"}
