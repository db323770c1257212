"""Training flow: per branch joint -> projection -> last layer, then fusion, the baseline and the
test-fold evaluation; the model is logged as an MLflow python_function model (weights + JSON, no pickle) and registered.

One parent MLflow run with a child run per branch and stage. Stages write result files in a work
folder keyed by (dataset, config): re-running after a kill redoes only unfinished work and a
half-trained stage resumes from its last epoch checkpoint. Task retries do the same in-process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.store import atomic_write_bytes
from ecgproto.data.summary import SPLIT_NAMES, store_dataset
from ecgproto.evaluation.metrics import difference_text
from ecgproto.explain import gallery_index, prototype_gallery
from ecgproto.progress import EpochProgress, stage_line
from ecgproto.report import StageReport, scored_metrics, without_scored
from ecgproto.settings import MODEL_NAME, workdir
from ecgproto.train import distributed, stages
from ecgproto.train.config import TrainConfig, default_preset
from ecgproto.train.quality import distinct_cases, is_distinct, quality_figure, quality_metrics, quality_summary
from ecgproto.train.report import (
    evaluation_report,
    fit_report,
    headline_markdown,
    projection_report,
    version_description,
)
from ecgproto.train.trainer import FitResult

REGISTERED_NAME = MODEL_NAME


def _curves(
    run_id: str, uri: str | None, label: str | None = None, epochs: int = 0
) -> Callable[[int, dict[str, float]], None]:
    """Per-epoch curves on the run; with `label`, also a progress line per epoch on the terminal."""
    show = EpochProgress(label, epochs) if label else None

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        tracking.log_metrics(run_id, m, step=epoch, uri=uri)
        if show is not None:
            show(epoch, m)

    return on_epoch


def run_stage(stage: str, parent: str, uri: str | None, branch: str | None, work: Callable[[str], Any]) -> Any:
    """A child MLflow run around `work(run_id)`, ended FAILED with the error if the work raises."""
    with tracking.stage_run(
        stage,
        run_name=f"{branch}/{stage}" if branch else stage,
        parent_run_id=parent,
        uri=uri,
        tags={"branch": branch or "all", "prefect_flow_run_id": str(flow_run.id)},
    ) as run_id:
        return work(run_id)


_FITS = {"joint": stages.train_joint, "last_layer": stages.train_last_layer}


@task(name="fit-branch", task_run_name="{branch}/{stage}", retries=1)
def fit_branch(
    store: str, config: TrainConfig, work_root: str, branch: str, stage: str, parent: str, uri: str | None
) -> float:
    """The joint or the last-layer stage of one branch, with per-epoch curves on its child run."""
    ctx = stages.TrainContext.open(store, config, work_root)

    def work(run_id: str) -> float:
        if stage == "joint" and config.world_size > 1:
            result = _data_parallel("joint", store, config, work_root, branch, ctx, run_id, uri)
        else:
            epochs = (config.joint if stage == "joint" else config.last_layer).epochs
            result = _FITS[stage](ctx, branch, _curves(run_id, uri, f"train {branch}/{stage}", epochs))
        tracking.log_report(run_id, fit_report(result, stage, branch), uri)
        return result.best_score

    return run_stage(stage, parent, uri, branch, work)


def _data_parallel(
    stage: str,
    store: str,
    config: TrainConfig,
    work_root: str,
    branch: str | None,
    ctx: stages.TrainContext,
    run_id: str,
    uri: str | None,
) -> FitResult:
    """The stage on config.world_size DDP ranks (torchrun); its curves are logged once it is done."""
    tracking.set_tags(run_id, {"world_size": str(config.world_size)}, uri)
    if stage == "joint":
        stages.teacher_scores(ctx)  # computed once here (when the black box teaches): the ranks only read them
    distributed.launch(stage, store, config, work_root, branch)
    result = stages.train_joint(ctx, branch) if stage == "joint" else stages.train_baseline(ctx)  # finished: loads
    curves = _curves(run_id, uri)
    for h in result.history:
        curves(int(h["epoch"]), h)
    return result


@task(name="projection", task_run_name="{branch}/projection", retries=1)
def projection(store: str, config: TrainConfig, work_root: str, branch: str, parent: str, uri: str | None) -> int:
    ctx = stages.TrainContext.open(store, config, work_root)

    def work(run_id: str) -> int:
        stage_line(f"train {branch}/projection: every prototype onto its nearest real training segment")
        provenance = stages.project(ctx, branch)
        tracking.log_report(run_id, projection_report(provenance), uri)
        return len(provenance)

    return run_stage("projection", parent, uri, branch, work)


@task(name="fusion", retries=1)
def fusion(store: str, config: TrainConfig, work_root: str, parent: str, uri: str | None, gallery: bool) -> float:
    ctx = stages.TrainContext.open(store, config, work_root)

    def work(run_id: str) -> float:
        result = stages.train_fusion(ctx, _curves(run_id, uri, "train fusion", config.fusion.epochs))
        report = fit_report(result, "fusion")
        model = stages.load_model(ctx)
        provenance = pd.DataFrame(model.provenance)
        report.tables["provenance"] = provenance
        if "purity" in provenance:  # the prototype-quality overview
            summary = quality_summary(provenance)
            report.tables["prototype_quality"] = summary
            report.tables["distinct_cases"] = distinct_cases(provenance)  # per class: how many cases it shows
            report.figures["prototype_quality.png"] = quality_figure(provenance)
            report.metrics.update(quality_metrics(summary))
        distinct = int(is_distinct(provenance).sum())
        report.description = (
            f"**Fusion** over every branch's prototypes: best validation (fold 9) macro-AUROC "
            f"**{result.best_score:.4f}**; the model's {distinct} distinct cases are its evidence.\n\nOpen: "
            + (
                "[the prototype gallery](artifacts/gallery/README.md) (every case, by branch and class), "
                if gallery
                else ""
            )
            + "[prototype quality](artifacts/prototype_quality.png), [provenance](artifacts/provenance.csv), "
            "[cases per class](artifacts/distinct_cases.csv)."
        )
        tracking.log_report(run_id, report, uri)
        if gallery:
            tracking.log_figures(run_id, prototype_gallery(model), uri)
            index = gallery_index(model, lambda path: tracking.run_link(run_id, path, uri))
            tracking.log_report(run_id, StageReport(documents={"gallery/README.md": index}), uri)
        return result.best_score

    return run_stage("fusion", parent, uri, None, work)


@task(name="baseline", retries=1)
def baseline(store: str, config: TrainConfig, work_root: str, parent: str, uri: str | None) -> float:
    ctx = stages.TrainContext.open(store, config, work_root)

    def work(run_id: str) -> float:
        if config.world_size > 1:
            result = _data_parallel("baseline", store, config, work_root, None, ctx, run_id, uri)
        else:
            result = stages.train_baseline(ctx, _curves(run_id, uri, "train black box", config.baseline.stage.epochs))
        tracking.log_report(run_id, fit_report(result, "baseline"), uri)
        return result.best_score

    return run_stage("baseline", parent, uri, None, work)


@task(name="evaluate-and-register")
def evaluate(
    store: str,
    config: TrainConfig,
    work_root: str,
    parent: str,
    uri: str | None,
    register_as: str | None,
    planted: tuple[str, ...],
) -> dict[str, Any]:
    ctx = stages.TrainContext.open(store, config, work_root)

    def work(run_id: str) -> dict[str, Any]:
        if (done := _registered_before(ctx, register_as, uri)) is not None:
            # The same model.pt is already registered in this tracking store: no second version.
            logged = scored_metrics(done["metrics"]) | without_scored(done["metrics"])
            tracking.log_report(
                run_id,
                StageReport(
                    metrics=logged,
                    tags={
                        "cache_hit": "true",
                        "model_version": str(done["version"]),
                        "evaluated_in_run": done["run_id"],
                    },
                ),
                uri,
            )
            tracking.log_report(parent, StageReport(metrics=scored_metrics(done["metrics"])), uri)
            return done
        stage_line("train evaluate: the whole test fold, bootstrap CIs, explained examples, registration")
        metrics, tables = stages.evaluate(ctx, "test")
        descriptions = dict(zip(ctx.labels.codes, ctx.labels.descriptions, strict=True))
        report = evaluation_report(metrics, tables, planted, descriptions)
        for name, figure, explanation in stages.explanation_examples(ctx, "test", planted):
            report.figures[f"explanations/{name}.png"] = figure
            report.documents[f"explanations/{name}.json"] = explanation
        report.datasets.append(store_dataset(ctx.store, "test", "test"))
        tracking.log_report(run_id, report, uri)
        tracking.log_report(parent, StageReport(metrics=scored_metrics(metrics)), uri)  # the headline on the parent
        stages.check_registrable(ctx, metrics)  # no epoch run, or no finite score: nothing is registered
        example = ctx.splits["test"].signals(np.arange(1))
        logged = tracking.log_model(run_id, stages.load_model(ctx), example, register_as, uri)
        if (black_box := ctx.path("baseline", "baseline.pt")).exists():  # scored beside the model elsewhere too
            tracking.log_black_box(run_id, black_box, uri)
        out = {"metrics": metrics | report.metrics, **logged, "run_id": run_id}
        if register_as:
            tracking.describe_model_version(
                register_as,
                logged["version"],
                version_description(metrics, ctx.store.key, run_id, tracking.run_link(parent, uri=uri)),
                uri,
            )
            _record_registration(ctx, out, uri)
        return out

    return run_stage("evaluate", parent, uri, None, work)


def _training_description(parent: str, result: dict[str, Any], uri: str | None) -> str:
    """The training run's Description: the test-fold headline, the version it became, where to look next."""
    links = {
        "evaluation (every label, calibration, explained ECGs)": tracking.run_link(result["run_id"], uri=uri),
    }
    if fusion := tracking.child_run_id(parent, "fusion", uri):
        links["the prototype gallery"] = tracking.run_link(fusion, "gallery/README.md", uri)
    version = f" Registered as version {result['version']}." if result.get("version") else ""
    return (
        headline_markdown(result["metrics"], "Test fold (fold 10)")
        + version
        + "\n\nOpen: "
        + ", ".join(f"[{k}]({v})" for k, v in links.items())
        + "; each stage's curves are in the child runs below."
    )


def _registration_file(ctx: stages.TrainContext) -> Path:
    return ctx.path("registered.json")


def _model_digest(ctx: stages.TrainContext) -> str:
    return hashlib.sha256(ctx.path("model.pt").read_bytes()).hexdigest()


def _record_registration(ctx: stages.TrainContext, out: dict[str, Any], uri: str | None) -> None:
    record = {**out, "model_sha256": _model_digest(ctx), "tracking_uri": tracking.tracking_uri(uri)}
    atomic_write_bytes(_registration_file(ctx), json.dumps(record, default=float).encode())


def _registered_before(ctx: stages.TrainContext, register_as: str | None, uri: str | None) -> dict[str, Any] | None:
    """The evaluation and registration of this very model.pt, if this tracking store still holds that version."""
    f = _registration_file(ctx)
    if not register_as or not f.exists():
        return None
    record = json.loads(f.read_text())
    if (
        record.get("registered_name") != register_as
        or record.get("tracking_uri") != tracking.tracking_uri(uri)
        or record.get("model_sha256") != _model_digest(ctx)
        or tracking.version_run_id(register_as, str(record.get("version")), uri) != record.get("run_id")
    ):
        return None
    return {k: record[k] for k in ("metrics", "model_uri", "version", "registered_name", "run_id")}


@flow(name="train", log_prints=True)
def train_flow(
    store: str,
    config: TrainConfig | None = None,
    work_root: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    register_as: str | None = REGISTERED_NAME,
    gallery: bool = True,
    planted: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train the three branches and the fusion (and the baseline) on a PTB-XL-layout store."""
    config = config or TrainConfig.preset(default_preset())
    work_root = work_root or str(workdir() / "data" / "train")
    ctx = stages.TrainContext.open(store, config, work_root)
    with tracking.stage_run(
        "train",
        parent_run_id=parent_run_id,
        uri=tracking_uri,
        run_name="train",
        tags={"prefect_flow_run_id": str(flow_run.id), "dataset_hash": ctx.store.key, "work_dir": str(ctx.workdir)},
        system_metrics=True,
    ) as parent:
        inputs = [store_dataset(ctx.store, SPLIT_NAMES[split], split) for split in ("train", "val", "test")]
        tracking.log_report(parent, StageReport(params={"config": config.model_dump()}, datasets=inputs), tracking_uri)
        for step in stages.plan(config):  # each stage a task of this flow, in the one order stages.plan gives
            if step.stage == "baseline":
                baseline(store, config, work_root, parent, tracking_uri)
            elif step.stage == "fusion":
                fusion(store, config, work_root, parent, tracking_uri, gallery)
            elif step.stage == "projection":
                projection(store, config, work_root, str(step.branch), parent, tracking_uri)
            else:
                fit_branch(store, config, work_root, str(step.branch), step.stage, parent, tracking_uri)
        result = evaluate(store, config, work_root, parent, tracking_uri, register_as, tuple(planted))
        description = _training_description(parent, result, tracking_uri)
        tracking.log_report(parent, StageReport(description=description), tracking_uri)
    m = result["metrics"]
    print(
        f"test fold macro-AUROC: fused {m['fused.macro_auroc']:.4f} "
        f"[{m['fused.macro_auroc_lo']:.4f}, {m['fused.macro_auroc_hi']:.4f}]"
        + (
            f", baseline {m['baseline.macro_auroc']:.4f}; fused - baseline {difference_text(m)} (paired)"
            if "baseline.macro_auroc" in m
            else ""
        )
    )
    version = result.get("version")
    model_uri = f"models:/{register_as}/{version}" if register_as and version else result["model_uri"]
    return {
        "run_id": parent,
        "evaluate_run_id": result["run_id"],
        "model_uri": model_uri,
        "model_version": version,
        "work_dir": str(ctx.workdir),
        "metrics": m,
        "store": str(Path(store)),
    }
