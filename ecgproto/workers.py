"""Process-pool helpers shared by ingest and scoring."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent: int) -> None:
    """Worker initializer: a worker gets SIGKILL when the process that started it dies (Linux), so a killed
    ingest or scoring run leaves no orphan holding a lock or writing chunks."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)
