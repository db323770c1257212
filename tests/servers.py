"""Helpers for tests that start real servers (mlflow, Prefect) as subprocesses on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, procs: list[subprocess.Popen], logs: list[Path]
) -> Any:
    """Poll `check` once a second until it returns something other than None; fail the test with the
    servers' logs if that takes longer than `timeout` or one of `procs` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (out := check()) is not None:
                return out
        except Exception:  # noqa: BLE001 - the server is still starting
            pass
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(1)
    pytest.fail(f"{what} did not happen in {timeout:.0f} s:\n" + "\n".join(f.read_text()[-3000:] for f in logs))
