"""Scheduled retraining: real Prefect flow runs, real training, a real MLflow registry (sqlite).

The champion/challenger rule is checked in both directions on the same data: a model of another seed
that must beat the champion by a whole AUROC unit (negative tolerance) stays challenger, and under a
tolerant rule the same model (its training and registration reused) is promoted. A re-run with
unchanged data and config registers nothing new.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgproto import tracking
from ecgproto.promotion import decide


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
ptbxl = "{demo_root / 'ptbxl'}"
store_root = "{tmp_path / 'store'}"
workers = 2
[train]
size = "small"
epochs = 1
seed = {seed}
baseline = false
bootstrap = 20
work_root = "{tmp_path / 'work'}"
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
        demo_root: Path, prefect_server: None, mlflow_uri: str, tmp_path: Path) -> None:
    from flows.retrain import deployment, retrain_flow

    first = retrain_flow(str(_config(tmp_path / "a.toml", demo_root, tmp_path, mlflow_uri, 0.0)))
    assert first["alias"] == "champion" and first["reason"] == "no champion yet"
    assert tracking.alias_version("retrain-test", "champion", mlflow_uri) == first["version"]

    # Same data, seed and config: every stage is a cache hit and no second version is registered.
    again = retrain_flow(str(_config(tmp_path / "b.toml", demo_root, tmp_path, mlflow_uri, -0.01)))
    assert again["version"] == first["version"] and again["alias"] == "champion"
    assert "already the champion" in again["reason"]
    assert [str(v.version) for v in tracking.client(mlflow_uri).search_model_versions("name = 'retrain-test'")] == [
        first["version"]]

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

    d = deployment(tmp_path / "c.toml")
    schedule = d.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1", "Europe/Berlin")
    assert d.parameters == {"config_path": str((tmp_path / "c.toml").resolve())}
