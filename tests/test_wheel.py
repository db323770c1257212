"""The package runs when installed from a wheel, outside the checkout: flows, reference tables, stores."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_ingests_with_its_own_flows_and_tables_into_the_current_folder(
    demo_root: Path, tmp_path: Path
) -> None:
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(dist)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    wheel = next(dist.glob("ecgproto-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "ecgproto/flows/pipeline.py",
        "ecgproto/reference/scp_branches.csv",
        "ecgproto/reference/phecodes/phecode12_icd9cm_icd10cm.csv.gz",
    } <= names
    assert not [n for n in names if n.startswith(("flows/", "data/", "tests/", "ecgproto/reference/demo"))]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    # a user's shell: none of the test session's settings, the wheel first on the path, another folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECGPROTO_", "PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ecgproto.flows.ingest as f, ecgproto.settings as s; print(f.__file__); print(s.reference_dir())",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    module, tables = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(tables) == site / "ecgproto" / "reference"

    out = subprocess.run(
        [sys.executable, "-m", "ecgproto.cli", "ingest", str(demo_root / "ptbxl")],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"store: {elsewhere / 'data' / 'store'}" in out.stdout  # the user's folder, not site-packages
    assert (elsewhere / "mlflow" / "mlflow.db").is_file()
    assert not (site / "mlflow").exists() and not (site / "data").exists()
