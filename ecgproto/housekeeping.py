"""What a killed run leaves behind that nothing else cleans up: Prefect's temporary API server.

A flow run without a Prefect server starts one as a child process (uvicorn, marked by the environment
variable PREFECT__SERVER_EPHEMERAL=1). Prefect stops it at exit, but a SIGKILL of the command skips that:
the server is reparented and keeps running, holding its port and database, forever. The next command
stops those left by earlier runs with the same PREFECT_HOME. Linux only (it reads /proc); elsewhere a no-op.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past a name that may hold ')'


def _is_python(pid: int) -> bool:
    try:
        argv0 = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return b"python" in Path(argv0.decode(errors="replace")).name.encode()


def orphaned_prefect_servers(prefect_home: str | Path) -> list[int]:
    """Pids of Prefect temporary servers of `prefect_home` whose starting process is gone (reparented to
    init or to a process that is not Python)."""
    if not PROC.is_dir():
        return []
    home = str(Path(prefect_home).resolve())
    me = os.getpid()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        env = _environ(pid)
        if env.get("PREFECT__SERVER_EPHEMERAL") != "1" or str(Path(env.get("PREFECT_HOME", "")).resolve()) != home:
            continue
        parent = _parent(pid)
        if parent is not None and (parent == 1 or not _is_python(parent)):
            found.append(pid)
    return found


def stop_orphaned_prefect_servers(prefect_home: str | Path) -> list[int]:
    """SIGTERM every orphaned temporary server of `prefect_home`; returns their pids."""
    stopped = []
    for pid in orphaned_prefect_servers(prefect_home):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except OSError:
            pass  # gone meanwhile, or not ours to stop
    return stopped
