"""Scheduled retraining: real Prefect flow runs, real training, a real MLflow registry (sqlite).

The champion/challenger rule is checked in both directions on the same data: a model of another seed
that must beat the champion by a whole AUROC unit (negative tolerance) stays challenger, and under a
tolerant rule the same model (its training and registration reused) is promoted. A re-run with
unchanged data and config registers nothing new.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from servers import free_port, wait_for

from ecgproto import tracking
from ecgproto.evaluation.promotion import decide


def test_promotion_rule_compares_with_the_tolerance() -> None:
    assert decide(0.80, None, 0.0).promote
    assert decide(0.795, 0.80, 0.01).promote  # worse, but within the tolerance
    refused = decide(0.78, 0.80, 0.01)
    assert not refused.promote and "0.7800 < champion 0.8000" in refused.reason
    assert not decide(0.80, 0.80, -0.01).promote  # a negative tolerance demands an improvement


def _config(path: Path, demo_root: Path, tmp_path: Path, uri: str, tolerance: float, seed: int = 11) -> Path:
    path.write_text(f"""
tracking_uri = "{uri}"
[data]
ptbxl = "{demo_root / "ptbxl"}"
store_root = "{tmp_path / "store"}"
workers = 2
[train]
size = "small"
epochs = 1
seed = {seed}
baseline = false
bootstrap = 20
work_root = "{tmp_path / "work"}"
[registry]
name = "retrain-test"
tolerance = {tolerance}
[schedule]
cron = "30 2 * * 1"
timezone = "Europe/Berlin"
""")
    return path


@pytest.mark.slow
def test_retraining_promotes_a_model_that_is_not_worse_and_keeps_a_worse_one_as_challenger(
    demo_root: Path, prefect_server: None, mlflow_uri: str, tmp_path: Path
) -> None:
    from ecgproto.flows.retrain import deployment, retrain_flow

    first = retrain_flow(str(_config(tmp_path / "a.toml", demo_root, tmp_path, mlflow_uri, 0.0)))
    assert first["alias"] == "champion" and first["reason"].startswith("the first champion")
    assert tracking.alias_version("retrain-test", "champion", mlflow_uri) == first["version"]

    # Same data, seed and config: every stage is a cache hit and no second version is registered.
    again = retrain_flow(str(_config(tmp_path / "b.toml", demo_root, tmp_path, mlflow_uri, -0.01)))
    assert again["version"] == first["version"] and again["alias"] == "champion"
    assert "already the champion" in again["reason"]
    assert [str(v.version) for v in tracking.client(mlflow_uri).search_model_versions("name = 'retrain-test'")] == [
        first["version"]
    ]

    # Another seed is another model; demanding an improvement of a whole AUROC unit keeps it challenger.
    second = retrain_flow(str(_config(tmp_path / "c.toml", demo_root, tmp_path, mlflow_uri, -1.0, seed=12)))
    assert second["alias"] == "challenger" and second["version"] != first["version"]
    assert "< champion" in second["reason"] and second["champion_auroc"] is not None
    assert tracking.alias_version("retrain-test", "champion", mlflow_uri) == first["version"]
    assert tracking.alias_version("retrain-test", "challenger", mlflow_uri) == second["version"]
    run = tracking.describe(second["run_id"], mlflow_uri)
    assert run["tags"]["promotion"] == "challenger" and run["tags"]["promotion_reason"] == second["reason"]
    assert "promotion.json" in run["artifacts"]

    # The same challenger under a tolerant rule: its training and registration are reused, and it wins.
    third = retrain_flow(str(_config(tmp_path / "c.toml", demo_root, tmp_path, mlflow_uri, 1.0, seed=12)))
    assert third["version"] == second["version"] and third["alias"] == "champion"
    assert third["previous_champion_version"] == first["version"]
    assert tracking.alias_version("retrain-test", "champion", mlflow_uri) == third["version"]

    _serve_and_run(tmp_path / "c.toml", tmp_path, mlflow_uri, third["version"])

    d = deployment(tmp_path / "c.toml")
    schedule = d.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1", "Europe/Berlin")
    assert d.parameters == {"config_path": str((tmp_path / "c.toml").resolve())}


def _serve_and_run(config: Path, tmp_path: Path, uri: str, champion: str) -> None:
    """`ecgproto serve` against a real Prefect server: the cron schedule is live (runs are scheduled at
    02:30 Berlin time on Mondays) and a run of the served deployment completes and keeps the champion."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    logs = [tmp_path / "prefect-server.log", tmp_path / "serve.log"]
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=logs[0].open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    procs = [server]
    try:
        wait_for(
            "the Prefect server start",
            lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200 or None,
            180,
            procs,
            logs,
        )
        served = subprocess.Popen(
            [str(bin_dir / "ecgproto"), "serve", str(config)],
            stdout=logs[1].open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(served)
        with temporary_settings({PREFECT_API_URL: url}):

            async def scheduled() -> list | None:  # noqa: ANN202
                async with get_client() as client:
                    dep = await client.read_deployment_by_name("retrain/ecgproto-retrain")
                    later = datetime.now(UTC) + timedelta(days=30)
                    runs = await client.get_scheduled_flow_runs_for_deployments([dep.id], scheduled_before=later)
                    return runs or None

            runs = wait_for(
                "scheduled runs of the served deployment", lambda: asyncio.run(scheduled()), 120, procs, logs
            )
            berlin = [r.expected_start_time.astimezone(ZoneInfo("Europe/Berlin")) for r in runs]
            assert all((t.weekday(), t.hour, t.minute) == (0, 2, 30) for t in berlin), berlin
            run = run_deployment("retrain/ecgproto-retrain", timeout=600)
        assert run.state is not None and run.state.is_completed(), (run.state, logs[1].read_text()[-3000:])
        assert tracking.alias_version("retrain-test", "champion", uri) == champion
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
