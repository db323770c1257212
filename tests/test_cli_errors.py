"""A user error reads as one line on stderr with exit code 2; the traceback only with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _ecgproto(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ecgproto.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_a_missing_dataset_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = _ecgproto("ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"ecgproto: {tmp_path / 'nope'}: dataset folder does not exist"]
    debug = _ecgproto("--debug", "ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[data]\nptbxl = "/x"\n[trian]\nsize = "small"\n', "trian: unknown key"),
        ('[data]\nptbxl = "/x"\n[registry]\ntolernace = 0.5\n', "registry.tolernace: unknown key"),
        ('[data]\nptbxl = "/x"\n[registry]\ntolerance = nan\n', "registry.tolerance"),
        ('[data]\nptbxl = "/x"\n[train]\nepochs = -3\n', "train.epochs"),
        ('[data]\nptbxl = "/x"\n[train]\ndevice = "tpu9"\n', "train.device"),
        ('[data]\nptbxl = "/x"\n[schedule]\ncron = "61 3 * * 1"\n', "is not a cron expression"),
        ('[data\nptbxl = "/x"\n', "not valid TOML"),
    ],
)
def test_a_bad_retraining_config_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    config = tmp_path / "retrain.toml"
    config.write_text(text)
    out = _ecgproto("retrain", str(config), cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"ecgproto: {config}: ") and expected in lines[0]


def test_an_unreachable_tracking_server_fails_fast_with_one_line(tmp_path: Path, demo_root: Path) -> None:
    record = next((demo_root / "ptbxl" / "records100").rglob("*.hea")).with_suffix("")
    start = time.perf_counter()
    out = _ecgproto(
        "explain", str(record), "--out", str(tmp_path), env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, cwd=tmp_path
    )
    assert time.perf_counter() - start < 30
    assert out.returncode == 2 and "cannot be reached" in out.stderr and len(out.stderr.strip().splitlines()) == 1
