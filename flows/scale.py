"""Where a flow's tasks run: Prefect's default thread pool, a local Dask cluster, or an existing one.

    runner(None)                      Prefect's default (threads in the flow's process)
    runner("local")                   a Dask LocalCluster, one single-threaded worker process per core
    runner("local:4")                 the same with 4 worker processes
    runner("tcp://scheduler:8786")    an existing Dask cluster (its workers must see the same files:
                                      the data folder, the store root and the output folder)

Needs the `scale` extra (`pip install 'ecgproto[scale]'`: prefect-dask, dask.distributed).
"""

from __future__ import annotations

import os

from prefect.task_runners import TaskRunner


def runner(spec: str | None) -> TaskRunner | None:
    """The task runner named by `spec` (see the module doc), or None for Prefect's default."""
    if not spec:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("a Dask task runner needs the scale extra: pip install 'ecgproto[scale]'") from exc
    if spec == "local" or spec.startswith("local:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"--dask {spec}: the worker count must be >= 1")
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        )
    if "://" in spec:
        return DaskTaskRunner(address=spec)
    raise ValueError(f"--dask {spec!r}: use 'local', 'local:N' or a scheduler address such as tcp://host:8786")
