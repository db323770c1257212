"""Data-parallel joint stages with torch DDP, launched through torchrun.

The training flow stays one process; when `TrainConfig.world_size` > 1 it runs each joint stage (and
the baseline) as `torchrun --standalone --nproc-per-node=W -m ecgproto.train.worker ...`. Every
rank builds the same network from the same seed, takes its slice of each global batch (the global
batch size is the config's, so the optimisation matches a one-process run), and DDP averages the
gradients. Every rank validates on the whole validation fold with the same weights, so early
stopping agrees without communication; only rank 0 writes checkpoints and the stage's output,
which are the files a one-process run writes: projection, last layer, fusion and evaluation then
run in the flow's process as usual.

Backends: NCCL on CUDA (one GPU per rank, `cuda:LOCAL_RANK`), gloo on CPU (tests run 2 ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ecgproto.train.config import TrainConfig


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` as DDP when in a process group of several ranks, else unchanged."""
    if rank_world()[1] == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


def check_replicas(model: nn.Module) -> None:
    """Raise if the ranks' parameters differ (they must after every DDP step)."""
    if rank_world()[1] == 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
    checksum = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float32)).sum()])
    gathered = [torch.zeros_like(checksum) for _ in range(rank_world()[1])]
    dist.all_gather(gathered, checksum)
    if any(not torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-6) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {[g.tolist() for g in gathered]}")


@contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """Join the torchrun process group; yields this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dev
    finally:
        dist.destroy_process_group()


def launch(stage: str, store: str, config: TrainConfig, work_root: str, branch: str | None = None) -> None:
    """Run one stage on `config.world_size` local ranks with torchrun; raises if any rank fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={config.world_size}",
        "-m",
        "ecgproto.train.worker",
        "--stage",
        stage,
        "--store",
        store,
        "--work-root",
        work_root,
        "--config",
        config.model_dump_json(),
    ]
    if branch:
        cmd += ["--branch", branch]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.world_size))),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        cause = next((x.strip() for x in reversed(lines) if "Error" in x), lines[-1].strip() if lines else "")
        raise RuntimeError(
            f"torchrun {stage} {branch or ''} failed (exit {done.returncode}): {cause[:300]}\n{done.stderr[-4000:]}"
        )
