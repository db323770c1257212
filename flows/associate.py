"""Association flow: a registered model scored on an external cohort, prototypes vs discharge phecodes.

One MLflow run holds the study's params (config and lineage: model version, training run, dataset
hash), the result table (parquet + TSV), the comparisons and the figures; credentialed-data rules
are applied before anything is logged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.store import ArrayStore, file_identity
from ecgproto.data.summary import store_dataset
from ecgproto.phenotype.study import PhenotypeStudy, StudyConfig, StudyResult, study_report, top_hits_markdown
from ecgproto.progress import stage_line
from ecgproto.scoring import ActivationStore, model_id
from ecgproto.settings import DEFAULT_MODEL_URI

DEFAULT_MODEL = DEFAULT_MODEL_URI


def study_key(_context: Any, p: dict[str, Any]) -> str:
    """Prefect cache key of a study: the cohort store's key, the hosp and report files' identities, the
    resolved model version and the config. A pipeline re-run after a later failure reuses the study."""
    hosp = sorted(Path(p["hosp"]).glob("*.csv*"))
    mm = p["machine_measurements"]
    acts = p.get("activations")
    payload = [
        ArrayStore.open(p["cohort_store"]).key,
        [(f.name, file_identity(f)) for f in hosp],
        file_identity(Path(mm)) if mm else None,
        p["model_uri"],
        p["config"].model_dump(),
        ActivationStore.open(acts).info["key"] if acts else None,
    ]
    return "study-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@task(name="run-study", cache_key_fn=study_key, persist_result=True)
def run_study(
    cohort_store: str,
    hosp: str,
    model_uri: str | None,
    machine_measurements: str | None,
    config: StudyConfig,
    uri: str | None,
    activations: str | None = None,
) -> StudyResult:
    model = tracking.load_model(model_uri, uri) if model_uri else None
    acts = ActivationStore.open(activations) if activations else None
    if acts is not None and model is not None and acts.info["model"] != model_id(model):
        raise ValueError(
            f"{acts.path}: these activations come from another model than {model_uri}; "
            f"score the cohort with it (`ecgproto score --model {model_uri}`)"
        )
    result = PhenotypeStudy(config).run(
        ArrayStore.open(cohort_store),
        Path(hosp),
        # with activations the model is not run; it is still needed to place each ECG's uncertainty
        None if acts and config.uncertain_ecgs == "keep" else model,
        Path(machine_measurements) if machine_measurements else None,
        activations=acts,
    )
    # Prefect persists this (for the cache): no subject, admission or record ids in it
    return result.without_identifiers()


@task(name="log-association")
def log_association(
    run_id: str,
    result: StudyResult,
    config: StudyConfig,
    lineage: dict[str, str],
    uri: str | None,
    cohort_store: str,
) -> dict[str, float]:
    report = study_report(result, config, lineage)
    if gallery := lineage.get("gallery_run_id"):  # the top hits link each prototype to its gallery image
        hits = report.tables.get("association/top_hits")
        if hits is not None:
            report.documents["association/top_hits.md"] = top_hits_markdown(
                hits, lambda path: tracking.run_link(gallery, path, uri)
            )
    report.datasets.append(store_dataset(ArrayStore.open(cohort_store), "cohort"))
    tracking.log_report(run_id, report, uri)
    return report.metrics


@flow(name="associate", log_prints=True)
def associate_flow(
    cohort_store: str,
    hosp: str,
    model_uri: str | None = DEFAULT_MODEL,
    machine_measurements: str | None = None,
    config: StudyConfig | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    activations: str | None = None,
) -> dict[str, object]:
    """Run the study; returns the MLflow run id, the headline metrics and the result table's artifact path.

    activations: an activation store of `model_uri` on `cohort_store` (`ecgproto score`, e.g. sharded on a
    cluster); the study reads the cohort's scores from it instead of running the model."""
    config = config or StudyConfig()
    lineage = tracking.model_lineage(model_uri, tracking_uri) if model_uri else {}
    store = ArrayStore.open(cohort_store)
    lineage["cohort_dataset_hash"] = store.key
    # The logging run of the resolved version, never 'latest' or an alias (and unique across tracking
    # stores), so the cache cannot hand back another model's study.
    resolved = f"runs:/{lineage['model_run_id']}/model" if "model_run_id" in lineage else model_uri
    stage_line("associate: the cohort scored, its diagnoses mapped to phecodes, every feature x phecode tested")
    with tracking.stage_run(
        "associate",
        parent_run_id=parent_run_id,
        uri=tracking_uri,
        error_detail=False,
        tags={"prefect_flow_run_id": str(flow_run.id), "cohort_dataset_hash": store.key},
    ) as run_id:
        state = run_study(
            cohort_store, hosp, resolved, machine_measurements, config, tracking_uri, activations, return_state=True
        )
        result = state.result()
        cached = state.name == "Cached"
        tracking.set_tags(run_id, {"study_cache_hit": str(cached).lower()}, tracking_uri)
        metrics = log_association(run_id, result, config, lineage, tracking_uri, cohort_store)
    if result.message:
        summary = f"association: {result.message}"
    else:
        significant = {
            k.split(".")[0]: (int(v), int(metrics[k.replace("_bonf", "_phecodes")]))
            for k, v in metrics.items()
            if k.endswith(".significant_bonf")
        }
        summary = (
            f"association: {int(metrics['phecodes_tested'])} phecodes tested; Bonferroni-significant pairs "
            "(distinct phecodes): " + ", ".join(f"{k} {v} ({c})" for k, (v, c) in significant.items())
        )
    print(summary)
    return {
        "run_id": run_id,
        "metrics": metrics,
        "cached": cached,
        "summary": summary,
        "tested": not result.message,
        "results": "association/results.parquet" if not result.message else "association/nothing_tested.json",
    }
