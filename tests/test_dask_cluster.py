"""A real Dask cluster, as a user runs one: `dask scheduler` and two `dask worker` processes started by their
command-line tools; ingest and scoring sent to it by address give the single-process stores, and a worker
killed mid-run leaves a store that the run (or its rerun) completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.store import ArrayStore
from ecgproto.scoring import ActivationStore, score_store
from tests.servers import free_port, wait_for

pytest.importorskip("prefect_dask")
distributed = pytest.importorskip("distributed")

DASK = Path(sys.executable).with_name("dask")


class Cluster:
    """A scheduler and single-threaded workers, each its own process group (killed whole at the end)."""

    def __init__(self, tmp: Path, n_workers: int) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
        }
        self._start(
            tmp,
            "scheduler",
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            env,
        )
        for i in range(n_workers):
            self.workers.append(
                self._start(
                    tmp,
                    f"worker{i}",
                    [
                        str(DASK),
                        "worker",
                        self.address,
                        "--nthreads",
                        "1",
                        "--no-nanny",
                        "--no-dashboard",
                        "--local-directory",
                        str(tmp / f"w{i}"),
                    ],
                    env,
                )
            )
        client = distributed.Client(self.address, timeout=60)
        try:
            wait_for(
                "two Dask workers joining",
                lambda: True if len(client.scheduler_info()["workers"]) == n_workers else None,
                60,
                self.procs,
                self.logs,
            )
        finally:
            client.close()

    def _start(self, tmp: Path, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = tmp / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture()
def cluster(tmp_path: Path):  # noqa: ANN201
    c = Cluster(tmp_path / "cluster", 2)
    yield c
    c.close()


def _kill_when(partial_glob: str, root: Path, worker: subprocess.Popen, done: threading.Event) -> None:
    """Kill `worker` once the run has written its first result file (mid-run, other work still pending)."""
    while not done.is_set():
        if any(root.glob(partial_glob)):
            os.killpg(worker.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_ingest_and_scoring_on_a_dask_cluster_of_separate_processes_equal_one_process(
    cluster: Cluster, prefect_server: None, mlflow_uri: str, ptbxl_copy: Path, demo_root: Path, tmp_path: Path
) -> None:
    from ecgproto import tracking
    from ecgproto.data.labels import load_label_set
    from ecgproto.flows.ingest import ingest_flow
    from ecgproto.flows.scale import runner
    from ecgproto.flows.score import score_flow
    from ecgproto.model.config import ModelConfig
    from ecgproto.model.network import ECGProtoNet
    from ecgproto.phenotype.features import prototype_table

    config = IngestConfig(workers=1, chunk_size=16)
    local = ingest(ptbxl_copy, tmp_path / "local", config, progress=False).store

    # ingest on the cluster; one of its two workers is killed after the first chunk is written
    done = threading.Event()
    killer = threading.Thread(
        target=_kill_when, args=(".partial-*/chunks/*.json", tmp_path / "cluster-store", cluster.workers[0], done)
    )
    killer.start()
    flow = ingest_flow.with_options(task_runner=runner(cluster.address))
    try:
        out = flow(str(ptbxl_copy), config, str(tmp_path / "cluster-store"), sharded=True)
    except Exception:  # noqa: BLE001 - the kill failed the run: the rerun resumes from the chunks written
        out = flow(str(ptbxl_copy), config, str(tmp_path / "cluster-store"), sharded=True)
    finally:
        done.set()
        killer.join()
    assert cluster.workers[0].poll() is not None, "the worker was not killed mid-run"
    sharded = ArrayStore.open(out["store"])
    assert sharded.key == local.key and len(local.manifest) > 200
    assert np.array_equal(np.asarray(sharded.signals), np.asarray(local.signals))
    assert np.array_equal(np.asarray(sharded.beats), np.asarray(local.beats))
    pd.testing.assert_frame_equal(sharded.manifest, local.manifest)
    pd.testing.assert_frame_equal(sharded.quarantine, local.quarantine)

    # scoring on the (remaining) cluster equals scoring in this process
    torch.manual_seed(3)
    model = ECGProtoNet(ModelConfig.small(), load_label_set()).eval()
    run = tracking.start_run("train", uri=mlflow_uri)
    x = np.array(local.signals[:1], dtype=np.float32)
    logged = tracking.log_model(run, model, x, "ecgproto-dask-test", uri=mlflow_uri)
    tracking.end_run(run, uri=mlflow_uri)
    one = score_store(local, model, tmp_path / "one", prototype_table(model), shard_size=10**6, batch_size=32)
    scored = score_flow.with_options(task_runner=runner(cluster.address))(
        str(sharded.path),
        f"models:/ecgproto-dask-test/{logged['version']}",
        str(tmp_path / "cluster-acts"),
        shard_size=64,
        batch_size=32,
        device="cpu",
        tracking_uri=mlflow_uri,
        sharded=True,
    )
    acts = ActivationStore.open(scored["activations"])
    assert len(acts.info["shards"]) > 2
    for kind in acts.kinds:
        assert np.array_equal(acts.matrix(kind), one.matrix(kind)), kind
