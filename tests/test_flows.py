"""Real Prefect flow runs against a real MLflow sqlite store, queried back through the client."""

import json
from pathlib import Path

import pytest

from ecgproto import tracking
from ecgproto.data.demo.generate import DemoConfig
from ecgproto.data.ingest import IngestConfig
from tests.conftest import SMALL


def test_ingest_flow_logs_one_mlflow_run_with_config_counts_and_artifacts(
    prefect_server: None, demo_root: Path, ptbxl_copy: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    from ecgproto.data.demo.faults import plant_faults
    from ecgproto.flows.ingest import ingest_flow

    expected = plant_faults(ptbxl_copy, ("truncated_dat", "flat_lead"))
    out = ingest_flow(str(ptbxl_copy), IngestConfig(workers=2), str(tmp_path / "store"), mlflow_uri)
    run = tracking.describe(out["run_id"], mlflow_uri)
    assert run["status"] == "FINISHED"
    assert run["params"]["config.preprocess.fs"] == "100" and run["params"]["layout"] == "ptbxl"
    assert run["metrics"]["n_records"] == SMALL["n_ptbxl"] - 2
    assert run["metrics"]["n_quarantined"] == 2 and run["metrics"]["quarantined.flat_lead"] == 1
    assert not any(k.startswith("label_count.") for k in run["metrics"])  # per-label counts: a table, not 71 metrics
    assert "**Ingest**" in run["tags"]["mlflow.note.content"] and "quarantine" in run["tags"]["mlflow.note.content"]
    inputs = tracking.client(mlflow_uri).get_run(out["run_id"]).inputs.dataset_inputs
    assert [i.tags[0].value for i in inputs] == ["output"] and inputs[0].dataset.digest == out["dataset_hash"][:32]
    assert run["tags"]["dataset_hash"] == out["dataset_hash"] and run["tags"]["stage"] == "ingest"
    assert len(run["tags"]["prefect_flow_run_id"]) == 36  # a real Prefect flow-run UUID
    for artifact in (
        "quarantine.csv",
        "quarantine.parquet",
        "label_prevalence.csv",
        "label_prevalence.png",
        "manifest_summary.csv",
        "store.json",
    ):
        assert artifact in run["artifacts"], artifact
    assert sum(a.startswith("examples/ecg_") for a in run["artifacts"]) >= 4
    quarantine = tracking.client(mlflow_uri).download_artifacts(out["run_id"], "quarantine.csv", str(tmp_path))
    text = Path(quarantine).read_text()
    assert all(record_id in text for record_id in expected)

    again = ingest_flow(str(ptbxl_copy), IngestConfig(workers=2), str(tmp_path / "store"), mlflow_uri)
    assert again["store"] == out["store"]
    assert tracking.describe(again["run_id"], mlflow_uri)["metrics"]["cache_hit"] == 1.0


@pytest.mark.slow
def test_demo_pipeline_makes_a_parent_run_with_child_stage_runs_and_no_mimic_identifiers(
    prefect_server: None, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecgproto.flows.pipeline import pipeline_flow

    monkeypatch.setenv("ECGPROTO_DEMO_DIR", str(tmp_path / "demo"))
    out = pipeline_flow(
        demo=True,
        demo_config=DemoConfig(**SMALL),
        store_root=str(tmp_path / "store"),
        tracking_uri=mlflow_uri,
        train_model=False,
    )  # training: tests/test_training.py
    c = tracking.client(mlflow_uri)
    children = c.search_runs(
        [c.get_run(out["parent_run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'"
    )
    assert sorted(r.data.tags["stage"] for r in children) == ["demo-data", "ingest", "ingest"]
    assert c.get_run(out["parent_run_id"]).data.tags["dataset_hash"] == out["dataset_hash"]
    demo = tracking.describe(out["demo_run_id"], mlflow_uri)
    assert "ground_truth.json" in demo["artifacts"]
    assert sum(a.startswith("demo_ecgs/") for a in demo["artifacts"]) >= 4
    cohort = tracking.describe(out["cohort_ingest_run_id"], mlflow_uri)
    assert cohort["tags"]["credentialed"] == "true"
    assert not any(a.startswith("examples/") for a in cohort["artifacts"])  # no patient waveforms
    q = Path(c.download_artifacts(out["cohort_ingest_run_id"], "quarantine.csv", str(tmp_path)))
    assert "record_id" not in q.read_text() and "subject_id" not in q.read_text()
    info = json.loads(Path(c.download_artifacts(out["cohort_ingest_run_id"], "store.json", str(tmp_path))).read_text())
    listed, stored, quarantined = (str(info[k]) for k in ("n_listed", "n_records", "n_quarantined"))
    assert quarantined.isdigit() or quarantined in ("<10", "suppressed")
    if listed.isdigit() and stored.isdigit():  # the quarantined cannot come back by subtraction
        assert not 0 < int(listed) - int(stored) < 10
    assert "shape" not in info


def test_a_run_left_running_by_a_killed_process_is_ended_at_the_next_run_of_its_stage(mlflow_uri: str) -> None:
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = gone.stdout.strip()  # a process that has exited: what a kill -9 leaves behind
    orphan = tracking.start_run("ingest", tags={"ecgproto.pid": dead_pid}, uri=mlflow_uri)
    live = tracking.start_run("ingest", uri=mlflow_uri)  # this process: alive, so left alone below
    assert tracking.describe(orphan, mlflow_uri)["status"] == "KILLED"
    tracking.start_run("ingest", uri=mlflow_uri)
    assert tracking.describe(live, mlflow_uri)["status"] == "RUNNING"
    assert "ended_by" in tracking.describe(orphan, mlflow_uri)["tags"]


def test_a_failed_stage_says_why_on_its_run_and_a_cohort_stage_keeps_the_message_without_identifiers(
    mlflow_uri: str,
) -> None:
    c = tracking.client(mlflow_uri)
    with pytest.raises(RuntimeError), tracking.stage_run("fusion", uri=mlflow_uri) as failed:
        raise RuntimeError("torchrun joint rhythm_1d failed (exit 1):\nrank 1: connection reset")
    info = tracking.describe(failed, mlflow_uri)
    assert info["status"] == "FAILED"
    assert info["tags"]["error"] == "RuntimeError: torchrun joint rhythm_1d failed (exit 1):"
    text = Path(c.download_artifacts(failed, "error.txt")).read_text()
    assert "rank 1: connection reset" in text  # the whole message, for the reviewer who opens the run

    with pytest.raises(ValueError), tracking.stage_run("associate", uri=mlflow_uri, error_detail=False) as private:
        raise ValueError(
            "files/p1000/p10000032/s40689238: unreadable; subject 10000032 admitted 2180-05-06 12:00, 3 records"
        )
    info = tracking.describe(private, mlflow_uri)
    assert info["status"] == "FAILED"
    # what went wrong stays readable; which patient, when and how few do not
    assert info["tags"]["error"] == "ValueError: <path>: unreadable; subject <id> admitted <date>, <10 records"
    assert not c.list_artifacts(private)  # no record path (it names a subject) anywhere on the run

    with pytest.raises(KeyboardInterrupt), tracking.stage_run("train", uri=mlflow_uri) as stopped:
        raise KeyboardInterrupt
    assert tracking.describe(stopped, mlflow_uri)["status"] == "KILLED"
    with tracking.stage_run("train", uri=mlflow_uri) as ok:
        pass
    assert tracking.describe(ok, mlflow_uri)["status"] == "FINISHED"
