"""End to end against a real `mlflow server` on 127.0.0.1: the demo pipeline (CI size) logs into it,
the REST client finds the lineage a reviewer walks, and headless Chromium renders an artifact image
on the run page (a screenshot is saved and logged to the pipeline run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import free_port, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "the mlflow server start",
            lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200 or None,
            180,
            [proc],
            [root / "server.log"],
        )
    except BaseException:
        proc.kill()
        raise
    yield SimpleNamespace(url=url, root=root)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def demo_pipeline(
    mlflow_server: SimpleNamespace, prefect_server: None, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    from ecgproto.data.demo.generate import DemoConfig
    from ecgproto.flows.pipeline import pipeline_flow
    from ecgproto.phenotype.study import StudyConfig
    from ecgproto.train.config import TrainConfig

    home = tmp_path_factory.mktemp("home")
    train = TrainConfig.small()
    train.joint.epochs = 2
    train = train.without_baseline()
    train.bootstrap = 20
    study = StudyConfig(min_cases=5, min_controls=5, targets={"401.1": "hypertension"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ECGPROTO_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        out = pipeline_flow(
            demo=True,
            demo_config=DemoConfig(n_ptbxl=300, n_hr=10, n_mimic_subjects=150, workers=2),
            store_root=str(home / "store"),
            tracking_uri=mlflow_server.url,
            train_config=train,
            study_config=study,
        )
        # an external evaluation of the registered version (the demo's PTB-XL-layout store as the foreign set)
        from ecgproto.flows.evaluate import evaluate_flow
        from ecgproto.settings import MODEL_NAME

        external = evaluate_flow(
            out["train_store"],
            f"models:/{MODEL_NAME}/{out['model_version']}",
            tracking_uri=mlflow_server.url,
            device="cpu",
            bootstrap=20,
        )
    return SimpleNamespace(out=out, home=home, external=external)


@pytest.mark.slow
def test_demo_pipeline_on_a_real_mlflow_server_leaves_the_lineage_a_reviewer_walks(
    mlflow_server: SimpleNamespace, demo_pipeline: SimpleNamespace
) -> None:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server.url)  # the REST API, as the UI uses it
    out = demo_pipeline.out
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = sorted(r.data.tags["stage"] for r in children)
    assert stages == ["associate", "demo-data", "ingest", "ingest", "promote", "train"]
    train = next(r for r in children if r.data.tags["stage"] == "train")
    assert train.data.tags["dataset_hash"] == out["dataset_hash"]
    version = c.get_model_version_by_alias("ecgproto-protoecgnet", "champion")
    assert str(version.version) == out["model_version"]
    associate = next(r for r in children if r.data.tags["stage"] == "associate")
    assert associate.data.tags["model_version"] == out["model_version"]  # the association names its model
    assert associate.data.tags["train_run_id"] == train.info.run_id
    files = {f.path for f in c.list_artifacts(associate.info.run_id, "association")}
    assert {"association/results.parquet", "association/results.tsv"} <= files
    figures = {f.path for f in c.list_artifacts(associate.info.run_id, "figures")}
    assert "figures/roc_curves.png" in figures and any(p.startswith("figures/manhattan_") for p in figures)
    grandchildren = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{train.info.run_id}'")
    fusion = next(r for r in grandchildren if r.data.tags["stage"] == "fusion")
    assert c.list_artifacts(fusion.info.run_id, "gallery")

    # review at a glance: a training experiment, the headline on the pipeline run and on the model version
    assert c.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # one metric vocabulary: the same headline column on the pipeline, training and evaluate runs
    # the training's own evaluate stage (the external evaluation below is a child of the training run too)
    evaluate = next(
        r for r in grandchildren if r.data.tags["stage"] == "evaluate" and r.data.tags.get("external") != "true"
    )
    headline = evaluate.data.metrics["test.macro_auroc"]
    assert parent.data.metrics["test.macro_auroc"] == train.data.metrics["test.macro_auroc"] == headline
    # every run below the pipeline says what it found, names its datasets and keeps its metrics scannable
    for run in [*children, *grandchildren]:
        assert run.data.tags.get("mlflow.note.content"), run.data.tags["mlflow.runName"]
        assert len(run.data.metrics) <= 60 and not any(
            "/" in k for k in run.data.metrics if not k.startswith("system/")
        )
    contexts = {
        r.data.tags["stage"]: {i.tags[0].value for i in c.get_run(r.info.run_id).inputs.dataset_inputs}
        for r in children
    }
    assert contexts["train"] == {"training", "validation", "test"} and contexts["associate"] == {"cohort"}
    assert "output" in contexts["ingest"]
    # the external evaluation belongs to its model: under the training run, in the vocabulary, on the version
    ext = c.get_run(demo_pipeline.external["run_id"])
    assert ext.data.tags["mlflow.parentRunId"] == train.info.run_id and "test.macro_auroc" in ext.data.metrics
    assert [i.tags[0].value for i in ext.inputs.dataset_inputs] == ["external"]
    described = c.get_model_version(version.name, version.version).description
    assert "External evaluation on" in described and "[Evaluate run](#/experiments/" in described
    assert parent.data.tags["model_alias"] == "champion"
    note = parent.data.tags["mlflow.note.content"]
    assert "Test fold macro-AUROC" in note and "Prototype gallery" in note and "phecodes tested" in note
    assert "Test fold macro-AUROC" in version.description and "Promotion: **champion**" in version.description
    logged = {f.path for f in c.list_artifacts(evaluate.info.run_id, "evaluation")}
    assert {"evaluation/summary.md", "evaluation/operating.csv"} <= logged  # what `ecgproto evaluate` sets beside
    assert [f for f in c.list_artifacts(evaluate.info.run_id, "explanations") if f.path.endswith(".png")]
    joint = next(r for r in grandchildren if r.data.tags["stage"] == "joint")
    assert c.get_metric_history(joint.info.run_id, "train_loss.bce")  # each loss term has its curve


def _browser_page(p):  # noqa: ANN001, ANN202 (playwright objects)
    """Debian's headless Chromium, offline (no background networking), and one page of 1600 x 1000."""
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    return browser, browser.new_page(viewport={"width": 1600, "height": 1000})


def _gallery_image(url: str, run_id: str) -> str:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=url)
    path = "gallery"
    while True:
        entries = c.list_artifacts(run_id, path)
        files = [e.path for e in entries if not e.is_dir and e.path.endswith(".png")]
        if files:
            return files[0]
        path = next(e.path for e in entries if e.is_dir)


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_run_page_renders_a_prototype_image_in_headless_chromium(
    mlflow_server: SimpleNamespace, demo_pipeline: SimpleNamespace
) -> None:
    from playwright.sync_api import sync_playwright

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server.url)
    parent = c.get_run(demo_pipeline.out["parent_run_id"])
    exp = parent.info.experiment_id
    train = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'train'")[0]
    fusion = c.search_runs([exp], f"tags.mlflow.parentRunId = '{train.info.run_id}' and tags.stage = 'fusion'")[0]
    image = _gallery_image(mlflow_server.url, fusion.info.run_id)
    page_url = f"{mlflow_server.url}/#/experiments/{exp}/runs/{fusion.info.run_id}/artifacts/{image}"
    shot = demo_pipeline.home / "screenshots" / "run_page_artifact.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = _browser_page(p)
        page.goto(page_url, wait_until="domcontentloaded", timeout=120_000)  # the UI keeps polling: no networkidle
        # The UI fetches the file through the server's artifact API and shows it from a blob: URL.
        page.wait_for_function(
            "() => Array.from(document.images).some("
            "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)",
            timeout=90_000,
        )
        width = page.evaluate(
            "() => Math.max(...Array.from(document.images)"
            ".filter(i => i.src.startsWith('blob:')).map(i => i.naturalWidth))"
        )
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert width > 200  # the prototype figure itself, decoded by the browser
    assert shot.stat().st_size > 10_000
    c.log_artifact(parent.info.run_id, str(shot), "ui_check")


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_the_pipeline_run_page_shows_its_description_and_headline_in_the_training_view(
    mlflow_server: SimpleNamespace, demo_pipeline: SimpleNamespace
) -> None:
    from playwright.sync_api import sync_playwright

    from ecgproto import tracking
    from ecgproto.settings import MODEL_NAME
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server.url)
    parent = c.get_run(demo_pipeline.out["parent_run_id"])
    # the URLs ecgproto prints: `make demo` (the pipeline run) and `ecgproto ui` (the experiment)
    run_url = tracking.run_url(parent.info.run_id, ui=mlflow_server.url, uri=mlflow_server.url)
    experiment_url = tracking.experiment_url(ui=mlflow_server.url, uri=mlflow_server.url)
    shots = demo_pipeline.home / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = _browser_page(p)
        page.goto(run_url, timeout=120_000)
        page.get_by_text("Test fold macro-AUROC").first.wait_for(timeout=90_000)  # the description, rendered
        page.get_by_text("test.macro_auroc").first.wait_for(timeout=30_000)  # the headline metric
        run_page = page.inner_text("body")
        page.screenshot(path=str(shots / "pipeline_run.png"), full_page=True)
        page.goto(experiment_url, timeout=120_000)
        page.get_by_text("Run Name").first.wait_for(timeout=90_000)  # the training view's runs table
        page.get_by_text("pipeline", exact=True).first.wait_for(state="attached", timeout=30_000)
        experiment_page = page.inner_text("body")
        page.screenshot(path=str(shots / "experiment.png"), full_page=True)
        # the model version's page: its description names the external evaluation
        version = demo_pipeline.out["model_version"]
        page.goto(f"{mlflow_server.url}/#/models/{MODEL_NAME}/versions/{version}", timeout=120_000)
        page.get_by_text("External evaluation on").first.wait_for(timeout=90_000)
        page.screenshot(path=str(shots / "model_version.png"), full_page=True)
        browser.close()
    store_hash = c.get_run(demo_pipeline.external["run_id"]).inputs.dataset_inputs[0].dataset.name.split()[1]
    assert store_hash in experiment_page  # the runs table's Dataset column names the store
    assert "Prototype gallery" in run_page
    assert "Judges" not in experiment_page and "Evaluation runs" not in experiment_page  # not the GenAI view
    for name in ("pipeline_run.png", "experiment.png", "model_version.png"):
        c.log_artifact(parent.info.run_id, str(shots / name), "ui_check")
