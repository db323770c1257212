"""Shared fixtures: a small demo dataset, a fresh MLflow sqlite store, one Prefect test server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ecgproto.settings import configure_environment

configure_environment()

SMALL = {"n_ptbxl": 240, "n_hr": 10, "n_mimic_subjects": 40, "workers": 2}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo (240 PTB-XL records, ~100 MIMIC ECGs), written once per session; do not modify."""
    from ecgproto.data.demo.generate import DemoConfig, generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", DemoConfig(**SMALL)).root


@pytest.fixture()
def ptbxl_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo PTB-XL folder that a test may corrupt."""
    dst = tmp_path / "ptbxl"
    shutil.copytree(demo_root / "ptbxl", dst)
    return dst


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ECGPROTO_HOME", str(tmp_path))
    return uri


@pytest.fixture(scope="session")
def prefect_server():  # noqa: ANN201
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def real_ptbxl_subset() -> Path | None:
    """The unpacked real PTB-XL subset (ECGPROTO_PTBXL_SUBSET, or the usual scratch folders)."""
    candidates = [os.environ.get("ECGPROTO_PTBXL_SUBSET"), ".scratch/ptbxl-subset", "/tmp/ptbxl/ptbxl-subset"]
    for c in candidates:
        if c and (Path(c) / "ptbxl_database.csv").exists():
            return Path(c).resolve()
    return None
