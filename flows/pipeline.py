"""The whole pipeline as one flow and one parent MLflow run with a child run per stage.

Stages: demo data (optional) -> ingest the training set -> ingest the external cohort -> train
(branches, projection, fusion, baseline), evaluate on fold 10 and register the model -> promote it to
the `champion` alias unless it is worse than the champion (else `challenger`) -> associate the
model's prototypes with the cohort's discharge phecodes.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.demo.beat_model import PLANTED_LABELS
from ecgproto.data.demo.generate import DemoConfig
from ecgproto.data.ingest import IngestConfig
from ecgproto.data.store import ArrayStore
from ecgproto.data.summary import store_dataset
from ecgproto.evaluation.metrics import difference_text
from ecgproto.flows.associate import associate_flow
from ecgproto.flows.demo_data import demo_data_flow
from ecgproto.flows.ingest import ingest_flow
from ecgproto.flows.retrain import compare_and_promote
from ecgproto.flows.train import REGISTERED_NAME, run_stage, train_flow
from ecgproto.phenotype.study import StudyConfig
from ecgproto.report import pipeline_report
from ecgproto.train.config import TrainConfig, default_preset


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    train_root: str | None = None,
    cohort_root: str | None = None,
    demo: bool = False,
    demo_config: DemoConfig | None = None,
    ingest_config: IngestConfig | None = None,
    store_root: str | None = None,
    tracking_uri: str | None = None,
    train_model: bool = True,
    train_config: TrainConfig | None = None,
    register_as: str | None = REGISTERED_NAME,
    hosp_root: str | None = None,
    study_config: StudyConfig | None = None,
    tolerance: float = 0.005,
) -> dict[str, str]:
    """Run the stages; with demo=True the inputs are the (generated) demo datasets and the model is
    the CPU-sized one on the demo's short schedule (`TrainConfig.demo()`) unless `train_config` says otherwise."""
    # the stage runs below carry their errors; this one only the type (a cohort's messages may name a record)
    with tracking.stage_run(
        "pipeline", uri=tracking_uri, tags={"prefect_flow_run_id": str(flow_run.id)}, error_detail=False
    ) as parent:
        out: dict[str, str] = {"parent_run_id": parent}
        if demo:
            d = demo_data_flow(config=demo_config, tracking_uri=tracking_uri, parent_run_id=parent)
            out["demo_run_id"] = d["run_id"]
            train_root = train_root or str(Path(d["root"]) / "ptbxl")
            mimic = Path(d["root"]) / "mimic-iv-ecg"
            cohort_root = cohort_root or (str(mimic) if mimic.exists() else None)
            hosp = Path(d["root"]) / "mimic-iv" / "hosp"
            hosp_root = hosp_root or (str(hosp) if hosp.exists() else None)
        if train_root is None:
            raise ValueError("give train_root (a PTB-XL folder) or demo=True")
        train = ingest_flow(train_root, ingest_config, store_root, tracking_uri, parent)
        out.update(train_store=train["store"], ingest_run_id=train["run_id"], dataset_hash=train["dataset_hash"])
        if cohort_root:
            cohort = ingest_flow(cohort_root, ingest_config, store_root, tracking_uri, parent)
            out.update(cohort_store=cohort["store"], cohort_ingest_run_id=cohort["run_id"])
        tracking.set_tags(parent, {"dataset_hash": train["dataset_hash"]}, tracking_uri)
        if train_model:
            config = train_config or TrainConfig.preset("demo" if demo else default_preset())
            planted = tuple(PLANTED_LABELS) if demo else ()
            t = train_flow(
                train["store"],
                config,
                tracking_uri=tracking_uri,
                parent_run_id=parent,
                register_as=register_as,
                planted=planted,
            )
            out.update(
                train_run_id=t["run_id"],
                model_uri=t["model_uri"],
                test_macro_auroc=f"{t['metrics']['fused.macro_auroc']:.4f}",
            )
            m = t["metrics"]
            if "fused_minus_baseline.macro_auroc" in m:  # the black box on the same fold, paired 95% CI
                out["baseline_macro_auroc"] = f"{m['baseline.macro_auroc']:.4f}"
                out["fused_minus_baseline"] = difference_text(m)
            if t.get("model_version") and register_as:
                out["model_version"] = str(t["model_version"])
                decision = run_stage(
                    "promote",
                    parent,
                    tracking_uri,
                    None,
                    lambda run_id: {
                        "run_id": run_id,
                        **compare_and_promote(
                            run_id, train["store"], register_as, out["model_version"], tolerance, tracking_uri
                        ),
                    },
                )
                out.update(promote_run_id=decision["run_id"], model_alias=str(decision["alias"]))
            if cohort_root and hosp_root:
                mm = Path(cohort_root) / "machine_measurements.csv"
                a = associate_flow(
                    out["cohort_store"],
                    hosp_root,
                    t["model_uri"],
                    str(mm) if mm.exists() else None,
                    study_config,
                    tracking_uri,
                    parent,
                )
                out["associate_run_id"] = str(a["run_id"])
                out["significant_prototype_pairs"] = str(int(a["metrics"].get("prototype.significant_bonf", 0)))
        title = "ecgproto pipeline on the demo data" if demo else f"ecgproto pipeline on {Path(train_root).name}"
        headline = pipeline_report(
            out,
            t["metrics"] if train_model else None,
            a["metrics"] if train_model and cohort_root and hosp_root else None,
            review_links(out, tracking_uri),
            title,
        )
        # the stores it ran on, so the pipeline's row in the runs table names its datasets
        if out.get("train_store"):
            headline.datasets.append(store_dataset(ArrayStore.open(out["train_store"]), "training"))
        if out.get("cohort_store"):
            headline.datasets.append(store_dataset(ArrayStore.open(out["cohort_store"]), "cohort"))
        tracking.log_report(parent, headline, tracking_uri)
    return out


def review_links(out: dict[str, str], uri: str | None) -> dict[str, str]:
    """UI links to what a reviewer opens after the headline: gallery, explanations, per-label metrics, association."""
    links: dict[str, str] = {}
    if "train_run_id" in out:
        fusion = tracking.child_run_id(out["train_run_id"], "fusion", uri)
        evaluate = tracking.child_run_id(out["train_run_id"], "evaluate", uri)
        if fusion:
            gallery = "Prototype gallery (every distinct case on its source ECG; README.md lists them)"
            links[gallery] = tracking.run_link(fusion, "gallery/README.md", uri)
        if evaluate:
            links["Explained test ECGs"] = tracking.run_link(evaluate, "explanations", uri)
            links["Per-label test metrics beside the black box"] = tracking.run_link(
                evaluate, "evaluation/summary.md", uri
            )
    if "associate_run_id" in out:
        a = out["associate_run_id"]
        links["Association: top hits"] = tracking.run_link(a, "association/top_hits.tsv", uri)
        links["Association: Manhattan plot of the prototypes"] = tracking.run_link(
            a, "figures/manhattan_prototype.png", uri
        )
    return links
