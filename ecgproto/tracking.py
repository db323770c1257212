"""The one module that talks to MLflow: tracking store, experiment, run naming, tags, artifact layout.

Runs are created and logged through `MlflowClient` with explicit run ids (MLflow's active run is
thread-local and Prefect tasks run on other threads). Default store: sqlite under `mlflow/`,
artifacts under `mlflow/artifacts`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ecgproto.report import DatasetRef, StageReport, flatten
from ecgproto.settings import default_tracking_uri, in_checkout, mlflow_dir, ui_url

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DEFAULT_EXPERIMENT = "ecgproto"
# MLflow 3 opens an experiment without a kind in its GenAI view (traces, judges, prompts); ours trains models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# ... and MLflow 3.17's UI picks its view from the URL (else the browser's last choice, GenAI at first): every
# link ecgproto prints or writes asks for the training view
TRAINING_VIEW = "?workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # the run's Description in the UI (markdown)
_MAX_PARAM = 6000
_BAD_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . space : / in names: 'label_count.PRC(S)' -> 'label_count.PRC_S_'."""
    return _BAD_NAME.sub("_", name)


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(name: str | None = None, uri: str | None = None) -> str:
    """Get or create the experiment, with artifacts under mlflow/artifacts for a local store."""
    name = name or os.environ.get("ECGPROTO_EXPERIMENT", DEFAULT_EXPERIMENT)
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        if not found.tags.get("mlflow.experimentKind"):  # made by an older ecgproto: open it as training too
            for k, v in EXPERIMENT_KIND.items():
                c.set_experiment_tag(found.experiment_id, k, v)
        return found.experiment_id
    location = None
    if tracking_uri(uri).startswith("sqlite:"):
        location = (mlflow_dir() / "artifacts").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another process
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    """The checkout's commit; for an installed wheel, its version (`ecgproto==0.1.0`)."""
    if not in_checkout():
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"ecgproto=={version('ecgproto')}"
        except PackageNotFoundError:
            return "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    stage: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> str:
    """Create a run for a stage and return its id. Tags: stage, git commit, parent, and the caller's."""
    all_tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "mlflow.runName": run_name or stage,
        "ecgproto.host": socket.gethostname(),
        "ecgproto.pid": str(os.getpid()),
        **(tags or {}),
    }
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    exp = experiment_id(experiment, uri)
    end_orphaned_runs(stage, exp, uri)
    run = client(uri).create_run(exp, tags=all_tags, run_name=run_name or stage)
    return run.info.run_id


def end_orphaned_runs(stage: str, experiment: str, uri: str | None = None) -> list[str]:
    """Runs of `stage` still RUNNING whose process on this machine is gone (killed before it could end
    them) are ended as KILLED, so the UI does not show them running forever. Returns their ids."""
    c = client(uri)
    host = socket.gethostname()
    ended = []
    for run in c.search_runs(
        [experiment], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'", max_results=200
    ):
        t = run.data.tags
        if t.get("ecgproto.host") != host or not t.get("ecgproto.pid", "").isdigit():
            continue
        if not _alive(int(t["ecgproto.pid"])):
            c.set_tag(run.info.run_id, "ended_by", f"a later {stage} run: its process {t['ecgproto.pid']} was gone")
            c.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status)


@contextmanager
def stage_run(
    stage: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
    run_name: str | None = None,
    error_detail: bool = True,
    system_metrics: bool = False,
) -> Iterator[str]:
    """A run around a block: yields its id; ends it FINISHED, or FAILED (KILLED on Ctrl-C) with the error.

    system_metrics: sample CPU, memory, disk (and GPU) onto the run while the block runs (training, scoring).
    error_detail: put the error's whole text on the run (tag `error`, artifact `error.txt`). False for stages
    that read credentialed cohorts, whose messages may name a record: then the tag keeps the error's type and
    its first line scrubbed of identifiers (privacy.scrub_message), and no artifact is written."""
    run_id = start_run(stage, tags=tags, parent_run_id=parent_run_id, uri=uri, run_name=run_name)
    monitor = _system_monitor(run_id, uri) if system_metrics else None
    try:
        yield run_id
    except BaseException as exc:
        if monitor is not None:
            monitor.finish()
        fail_run(run_id, exc, uri, detail=error_detail)
        raise
    if monitor is not None:
        monitor.finish()
    end_run(run_id, uri=uri)


def _system_monitor(run_id: str, uri: str | None) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; the GPU where there is one) on the run every 10 s,
    as the UI's System metrics tab shows them; None when MLflow cannot sample here (the run goes on)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri(uri))
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - monitoring is a nicety, never a reason to fail a run
        logging.getLogger(__name__).warning("no system metrics for run %s: %s", run_id, e)
        return None


def fail_run(run_id: str, exc: BaseException, uri: str | None = None, *, detail: bool = True) -> None:
    """End a run FAILED (KILLED for an interrupt) and say why on it; never masks `exc` if MLflow fails too."""
    killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
    text = str(exc).strip()
    first = text.splitlines()[0][:480] if text else ""
    if not detail and first:
        from ecgproto.privacy import scrub_message

        first = scrub_message(first)
    summary = type(exc).__name__ + (f": {first}" if first else "")
    try:
        set_tags(run_id, {"error": summary}, uri)
        if detail and text:
            client(uri).log_text(run_id, f"{type(exc).__name__}: {text}\n", "error.txt")
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        logging.getLogger(__name__).warning("could not record the error on run %s: %s", run_id, e)
    try:
        end_run(run_id, "KILLED" if killed else "FAILED", uri)
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not end run %s: %s", run_id, e)


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_report(run_id: str, report: StageReport, uri: str | None = None) -> None:
    """Send a stage's params, metrics, tags and artifacts to its run."""
    c = client(uri)
    params = [Param(metric_name(k), str(v)[:_MAX_PARAM]) for k, v in flatten(report.params).items()]
    now = int(time.time() * 1000)
    metrics = [Metric(metric_name(k), float(v), now, 0) for k, v in report.metrics.items()]
    tags = [RunTag(k, str(v)) for k, v in report.tags.items()]
    if report.description is not None:  # '](artifacts/x.csv)' links open the run's own artifact in the UI
        text = re.sub(
            r"\]\(artifacts/([^)\s]+)\)", lambda m: f"]({run_link(run_id, m.group(1), uri)})", report.description
        )
        tags.append(RunTag(NOTE_TAG, text))
    for i in range(0, max(len(params), 1), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=params[i : i + 100], metrics=metrics if i == 0 else [], tags=tags if i == 0 else [])
    if report.datasets:
        c.log_inputs(run_id, datasets=[_dataset_input(d) for d in report.datasets])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for path, table in report.tables.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            for fmt in report.formats.get(path, ("csv", "parquet")):
                if fmt == "parquet":
                    table.to_parquet(target.with_suffix(".parquet"), index=False)
                else:
                    table.to_csv(target.with_suffix(f".{fmt}"), index=False, sep="\t" if fmt == "tsv" else ",")
        _save_figures(root, report.figures.items())
        for path, doc in report.documents.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2, default=str))
        _upload(c, run_id, root)


def _dataset_input(ref: DatasetRef) -> Any:
    """A DatasetRef as MLflow's dataset input (the runs table's Dataset column, with its context)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(
        ref.name, ref.digest, "local", json.dumps({"uri": ref.source}), profile=json.dumps(ref.profile) or None
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, ref.context)])


def log_figures(run_id: str, figures: Iterable[tuple[str, Figure]], uri: str | None = None) -> int:
    """Save figures one at a time (each closed once written) and upload them; returns how many."""
    with tempfile.TemporaryDirectory() as tmp:
        n = _save_figures(Path(tmp), figures)
        _upload(client(uri), run_id, Path(tmp))
    return n


def _save_figures(root: Path, figures: Iterable[tuple[str, Figure]]) -> int:
    n = 0
    for path, fig in figures:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
        n += 1
    return n


def _upload(c: MlflowClient, run_id: str, root: Path) -> None:
    for entry in root.iterdir():
        if entry.is_dir():
            c.log_artifacts(run_id, str(entry), artifact_path=entry.name)
        else:
            c.log_artifact(run_id, str(entry))


def run_url(run_id: str, ui: str | None = None, uri: str | None = None) -> str:
    """The run's page in the MLflow UI at `ui` (default: settings.ui_url(), the configured address)."""
    return f"{ui or ui_url()}/{run_link(run_id, uri=uri)}"


def experiment_url(ui: str | None = None, uri: str | None = None) -> str:
    """The experiment's page in the MLflow UI, in the training view."""
    return f"{ui or ui_url()}/#/experiments/{experiment_id(uri=uri)}{TRAINING_VIEW}"


def ui_command(uri: str | None = None, port: int = 5000) -> list[str]:
    """The command that serves the MLflow UI for this store on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri(uri),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def describe(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """Params, metrics, tags and artifact paths of a run (what a reviewer sees in the UI)."""
    c = client(uri)
    run = c.get_run(run_id)

    def walk(path: str | None = None) -> list[str]:
        out = []
        for f in c.list_artifacts(run_id, path):
            out += walk(f.path) if f.is_dir else [f.path]
        return out

    return {
        "params": run.data.params,
        "metrics": run.data.metrics,
        "tags": run.data.tags,
        "artifacts": walk(),
        "status": run.info.status,
    }


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0, uri: str | None = None) -> None:
    """Per-epoch curves: one batch of metrics at `step`."""
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()])


def log_model(
    run_id: str, model: Any, input_example: Any, registered_name: str | None, uri: str | None = None
) -> dict[str, str]:
    """Log a network as an MLflow `python_function` model whose loader is `ecgproto.mlflow_model`: the
    artifact holds its weights and JSON description, no pickle. Register it under `registered_name`."""
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.utils import logging_utils

    import mlflow
    from ecgproto.mlflow_model import PARAMS, WEIGHTS
    from ecgproto.model import persist

    mlflow.set_tracking_uri(tracking_uri(uri))
    with torch.no_grad():
        output = model(torch.as_tensor(np.array(input_example))).numpy()  # a copy: a store memmap is read-only
    signature = infer_signature(np.asarray(input_example), output, params=PARAMS)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature states the input; an example ECG (12,000 numbers as JSON) would add nothing to it
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        data = Path(tmp) / "ecgproto"
        persist.save(model.cpu(), data / WEIGHTS)
        stream = logging_utils.MLFLOW_LOGGING_STREAM
        was, stream.enabled = stream.enabled, False  # "Registered model ... Creating a new version": ours to say
        try:
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="ecgproto.mlflow_model",
                data_path=str(data),
                signature=signature,
                registered_model_name=registered_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "ecgproto"],
            )
        finally:
            stream.enabled = was
    out = {"model_uri": info.model_uri}
    if registered_name:
        versions = client(uri).search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
        out["version"] = str(max(int(v.version) for v in versions))
        out["registered_name"] = registered_name
    return out


def resolve_model_uri(model_uri: str, uri: str | None = None) -> str:
    """`models:/NAME@champion` when that alias exists; else, with a warning on stderr, `models:/NAME/latest`
    (a registry where nothing was promoted yet). Other URIs unchanged."""
    if not model_uri.endswith("@champion") or not model_uri.startswith("models:/"):
        return model_uri
    from mlflow.exceptions import MlflowException

    name = model_uri.removeprefix("models:/").removesuffix("@champion")
    try:
        client(uri).get_model_version_by_alias(name, "champion")
        return model_uri
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # the server, not the alias: say so (e.g. unreachable)
    print(f"ecgproto: warning: {name} has no 'champion' version yet; using its latest version", file=sys.stderr)
    return f"models:/{name}/latest"


def load_model(model_uri: str, uri: str | None = None) -> Any:
    """A logged model by URI: 'models:/<name>/<version>', 'models:/<name>@<alias>' or 'runs:/<id>/model'.
    Rebuilt from its weights and description (`ecgproto.model.persist`); nothing in it is unpickled."""
    import yaml

    import mlflow
    from ecgproto.mlflow_model import load_from_data
    from ecgproto.model.persist import ModelFileError

    mlflow.set_tracking_uri(tracking_uri(uri))
    model_uri = resolve_model_uri(model_uri, uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
        if flavor.get("loader_module") != "ecgproto.mlflow_model":
            raise ModelFileError(
                f"{model_uri}: not loaded by ecgproto (its MLmodel names loader "
                f"{flavor.get('loader_module') or 'none'}: registered by an older ecgproto as a pickled torch "
                "model, by another tool, or altered since), and unpickling it could run code - train and register "
                "it again (`ecgproto train`, or `ecgproto retrain`)"
            )
        try:
            return load_from_data(local / flavor["data"])
        except ModelFileError as exc:  # name the model the user gave, not the temporary download folder
            text = str(exc).replace(str(local) + os.sep, "").replace(str(local), "")
            raise ModelFileError(f"{model_uri}: {text}") from exc


BLACK_BOX_ARTIFACT = "black_box/baseline.pt"  # beside the logged model: the black box trained with it


def log_black_box(run_id: str, weights: Path, uri: str | None = None) -> None:
    """The black box trained beside a model, on the run that logs the model (weights + JSON description, the
    format ecgproto.model.persist writes and reads without unpickling), so an external evaluation can score it."""
    c = client(uri)
    folder = str(Path(BLACK_BOX_ARTIFACT).parent)
    for f in (weights, weights.with_suffix(".json")):
        c.log_artifact(run_id, str(f), folder)


def load_black_box(model_run_id: str, uri: str | None = None) -> Any | None:
    """The black box logged beside a model (`log_black_box`), or None when its training had none."""
    from ecgproto.model import persist

    c = client(uri)
    folder = str(Path(BLACK_BOX_ARTIFACT).parent)
    if BLACK_BOX_ARTIFACT not in {f.path for f in c.list_artifacts(model_run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(c.download_artifacts(model_run_id, folder, tmp))
        return persist.load(local / Path(BLACK_BOX_ARTIFACT).name)


def model_lineage(model_uri: str, uri: str | None = None) -> dict[str, str]:
    """Where a registered model came from: its version, the run that logged it, the training run and
    the run holding the prototype gallery (the training's `fusion` child)."""
    c = client(uri)
    model_uri = resolve_model_uri(model_uri, uri)
    out = {"model_uri": model_uri}
    if model_uri.startswith("models:/"):
        ref = model_uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        elif "/" not in ref:  # a logged model that was never registered: models:/m-<id>
            out["model_run_id"] = c.get_logged_model(ref).source_run_id
            mv = None
        else:
            name, version = ref.split("/", 1)
            if version == "latest":
                version = str(max(int(v.version) for v in c.search_model_versions(f"name = '{name}'")))
            mv = c.get_model_version(name, version)
        if mv is not None:
            out.update(model_name=mv.name, model_version=str(mv.version), model_run_id=mv.run_id)
    elif model_uri.startswith("runs:/"):
        out["model_run_id"] = model_uri.removeprefix("runs:/").split("/", 1)[0]
    run_id = out.get("model_run_id")
    if run_id:
        run = c.get_run(run_id)
        train = run.data.tags.get("mlflow.parentRunId", "")
        out["train_run_id"] = train
        out["dataset_hash"] = run.data.tags.get("dataset_hash", "") or (
            c.get_run(train).data.tags.get("dataset_hash", "") if train else ""
        )
        if train:
            found = c.search_runs(
                [run.info.experiment_id], f"tags.mlflow.parentRunId = '{train}' and tags.stage = 'fusion'"
            )
            if found:
                out["gallery_run_id"] = found[0].info.run_id
    return out


def version_run_id(name: str, version: str, uri: str | None = None) -> str | None:
    """The run that logged version `version` of registered model `name`, or None if it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(uri).get_model_version(name, version).run_id)
    except MlflowException:
        return None


def alias_version(name: str, alias: str, uri: str | None = None) -> str | None:
    """The version a registered-model alias points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_description(run_id: str, markdown: str, uri: str | None = None) -> None:
    """The run's Description in the MLflow UI (markdown; relative links `#/experiments/...` open in the UI)."""
    set_tags(run_id, {NOTE_TAG: markdown}, uri)


def run_link(run_id: str, path: str | None = None, uri: str | None = None) -> str:
    """A link the MLflow UI opens (relative: `#/...`): the run's page, or one of its artifacts, training view."""
    exp = client(uri).get_run(run_id).info.experiment_id
    return f"#/experiments/{exp}/runs/{run_id}" + (f"/artifacts/{path}" if path else "") + TRAINING_VIEW


def run_table(run_id: str, path: str, uri: str | None = None) -> pd.DataFrame | None:
    """A CSV artifact of a run as a table (e.g. the per-label test metrics of the run that logged a model);
    None when the run does not have it."""
    import pandas as pd

    c = client(uri)
    folder = str(Path(path).parent)
    if path not in {f.path for f in c.list_artifacts(run_id, folder if folder != "." else None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(c.download_artifacts(run_id, path, tmp))


def child_run_id(parent: str, stage: str, uri: str | None = None) -> str | None:
    """The newest FINISHED child run of `parent` for `stage` (e.g. the fusion run of a train run)."""
    c = client(uri)
    runs = c.search_runs(
        [c.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.stage = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def describe_model_version(
    name: str, version: str, markdown: str, uri: str | None = None, *, append: bool = False
) -> None:
    """The registered version's Description (test-fold metrics, training data, promotion); `append` adds a
    paragraph to what is there."""
    c = client(uri)
    if append:
        before = c.get_model_version(name, str(version)).description or ""
        markdown = f"{before}\n\n{markdown}" if before else markdown
    c.update_model_version(name, str(version), description=markdown)


def set_alias(name: str, alias: str, version: str, uri: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Point `alias` at `version` and tag that version (e.g. with the promotion decision)."""
    c = client(uri)
    c.set_registered_model_alias(name, alias, str(version))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(name, str(version), k, str(v))
