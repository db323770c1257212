"""What the training benchmarks share: PTB-XL's split sizes, device sync, threads, a real folder's store."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ecgproto.data.store import ArrayStore

PTBXL_TRAIN_RECORDS = 17_418
PTBXL_SPLITS = {"train": PTBXL_TRAIN_RECORDS, "val": 2_183, "test": 2_198}  # folds 1-8 / 9 / 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def ingest_real(root: Path, scratch: Path) -> ArrayStore:
    """The store of an unpacked PTB-XL folder (ingest's cache makes a second call a hit)."""
    from ecgproto.data.ingest import IngestConfig, ingest

    return ingest(root, scratch / "store", IngestConfig(workers=os.cpu_count() or 2), progress=False).store
