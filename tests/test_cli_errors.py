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


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_a_prefect_server_left_by_a_killed_run_is_stopped_by_the_next_command(tmp_path: Path) -> None:
    from ecgproto.housekeeping import orphaned_prefect_servers

    home = tmp_path / ".prefect"
    env = {**os.environ, "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_HOME": str(home)}
    sleeper = "import time; time.sleep(120)"
    # what a kill -9 of a command leaves: its temporary server, its parent gone
    starter = subprocess.run(
        [
            sys.executable,
            "-c",
            "import subprocess as s, sys; "
            f"print(s.Popen([sys.executable, '-c', {sleeper!r}], stdout=s.DEVNULL, stderr=s.DEVNULL).pid)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    left = int(starter.stdout)
    live = subprocess.Popen([sys.executable, "-c", sleeper], env=env)  # another command's, still running
    try:
        assert orphaned_prefect_servers(home) == [left]
        out = _ecgproto("ingest", str(tmp_path / "nope"), env={"PREFECT_HOME": str(home)}, cwd=tmp_path)
        assert f"stopped a Prefect server (pid {left}) left running by a killed earlier run" in out.stderr
        deadline = time.time() + 10
        while _running(left) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(left) and live.poll() is None
    finally:
        live.kill()
        if _running(left):
            os.kill(left, 9)


@pytest.mark.parametrize(
    ("args", "option", "rule"),
    [
        (("train", "STORE", "--epochs", "-3"), "--epochs", "an integer from 1 to 10000"),
        (("train", "STORE", "--world-size", "0"), "--world-size", "an integer from 1 to 1024"),
        (("ingest", "DIR", "--fs", "0"), "--fs", "an integer from 50 to 2000"),
        (("ingest", "DIR", "--fs", "-100"), "--fs", "an integer from 50 to 2000"),
        (("explain", "REC", "--top-k", "-1"), "--top-k", "an integer from 1 to 20"),
        (
            ("associate", "DIR", "--hosp", "H", "--uncertainty-percentile", "nan"),
            "--uncertainty-percentile",
            "0 to 100",
        ),
        (("score", "STORE", "--batch-size", "many"), "--batch-size", "an integer from 1 to 65536"),
    ],
)
def test_a_number_out_of_its_range_is_one_line_naming_the_option_before_any_work(
    args: tuple[str, ...], option: str, rule: str, tmp_path: Path
) -> None:
    out = _ecgproto(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and rule in lines[0], lines
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "data").exists()  # nothing started


def test_a_training_that_never_scored_registers_nothing(tmp_path: Path) -> None:
    import torch

    from ecgproto.data.labels import BRANCHES
    from ecgproto.errors import UserError
    from ecgproto.train.stages import check_registrable

    class Work:
        def path(self, *parts: str) -> Path:
            p = tmp_path.joinpath(*parts)
            p.parent.mkdir(parents=True, exist_ok=True)
            return p

    work = Work()
    done = {"history": [{"epoch": 0, "val_macro_auroc": 0.8}], "best": 0.8, "best_epoch": 0, "epoch": 0}
    for name in BRANCHES:
        for stage in ("joint", "last_layer"):
            torch.save(done, work.path(name, f"{stage}.ckpt"))
    torch.save(done, work.path("fusion", "fusion.ckpt"))
    check_registrable(work, {"fused.macro_auroc": 0.9})  # a model that learned: registered
    with pytest.raises(UserError, match="test fold's macro-AUROC is nan"):
        check_registrable(work, {"fused.macro_auroc": float("nan")})
    torch.save({**done, "history": [], "best": -1.797e308}, work.path("rhythm_1d", "joint.ckpt"))  # 0 epochs run
    with pytest.raises(UserError, match="rhythm_1d/joint: the stage ran no epoch"):
        check_registrable(work, {"fused.macro_auroc": 0.9})


@pytest.mark.parametrize(
    ("device", "expected"),
    [("banana", "'banana' is not a device"), ("cuda:x", "is not a device")]
    + [("cuda", "use --device cpu")] * (not __import__("torch").cuda.is_available()),
)
def test_a_device_that_is_not_there_is_one_line_before_any_work(device: str, expected: str, tmp_path: Path) -> None:
    out = _ecgproto("train", "STORE", "--device", device, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device" in lines[0] and expected in lines[0], lines
    assert "a GPU is here" not in out.stderr


def test_a_record_that_cannot_be_read_is_a_user_error_naming_its_file(tmp_path: Path) -> None:
    from ecgproto.cli_messages import describe
    from ecgproto.data.wfdb_io import read_record

    (tmp_path / "r.hea").write_text("r 3 100 1000\nr.dat 16 200 16 0 0 0 0 I\nr.dat 16 200 16 0 0 0 0 II\n")
    with pytest.raises(Exception) as caught:
        read_record(tmp_path / "r")
    code, text = describe(caught.value)
    assert code == 2 and str(tmp_path / "r.hea") in text and "a bug" not in text


def test_printed_run_links_use_the_configured_ui_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI behind a proxy or on another port: the links commands print go there, not to port 5000."""
    from ecgproto import settings

    monkeypatch.delenv("ECGPROTO_UI_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert settings.ui_url() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.hospital.org:8080/")
    assert settings.ui_url() == "http://mlflow.hospital.org:8080"  # a tracking server serves its own UI
    monkeypatch.setenv("ECGPROTO_UI_URL", "https://review.hospital.org/mlflow/")
    assert settings.ui_url() == "https://review.hospital.org/mlflow"
