"""The cached array store: memory-mapped signals + a parquet manifest, published atomically.

Layout of one store (a folder named `<layout>-<key16>`):
  signals.npy      (n_rows, 12, n_samples) float32/float16, memory-mappable, rows of quarantined
                   records are left as zero holes (manifest.row maps a record to its row)
  beats.npy        (n_rows, max_beats) int16 beat positions in samples, -1 padded (ecgproto.data.beats);
                   manifest.beat_source says whether they were detected or laid on the fallback grid
  labels.npy       (n_rows, n_labels) uint8 multi-hot (PTB-XL layout only)
  manifest.parquet one row per usable record: record_id, row, split, metadata, provenance
  quarantine.parquet one row per refused record: record_id, file, reason, message
  store.json       config, cache key, counts, lead and label order, versions
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STORE_FORMAT = 2  # 2: beats.npy


def file_identity(path: Path | str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None if absent: make-style identity, cheap on 800k records."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(payload: dict[str, Any], record_paths: list[Path]) -> str:
    """Hash of the config, the index files' content and every record file's identity."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": STORE_FORMAT, **payload}, sort_keys=True, default=str).encode())
    for base in map(os.fspath, record_paths):
        name = os.path.basename(base)
        for suffix in (".hea", ".dat", ".mat"):
            identity = file_identity(base + suffix)
            if suffix == ".mat" and identity is None:  # Challenge sets' signal files; absent elsewhere
                continue
            h.update(f"{name}{suffix}{identity}".encode())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def publish(partial: Path, final: Path) -> None:
    """Make a fully written store visible in one rename; a crash before it leaves no partial store."""
    for f in partial.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # another process published the same key first: identical content
        shutil.rmtree(partial)
        return
    os.rename(partial, final)


@dataclass
class ArrayStore:
    """A published store, opened read-only; arrays are memory-mapped, never loaded whole."""

    path: Path

    @classmethod
    def open(cls, path: Path | str) -> ArrayStore:
        path = Path(path)
        if not (path / "store.json").exists():
            raise FileNotFoundError(f"{path}: not an ecgproto store (no store.json); run `ecgproto ingest` first")
        return cls(path)

    @cached_property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "store.json").read_text())

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "manifest.parquet")

    @cached_property
    def quarantine(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "quarantine.parquet")

    @cached_property
    def signals(self) -> np.ndarray:
        """(n_rows, 12, n_samples) memmap; index it with manifest.row."""
        return np.load(self.path / "signals.npy", mmap_mode="r")

    @cached_property
    def beats(self) -> np.ndarray:
        """(n_rows, max_beats) int16 memmap of beat positions (samples), -1 padded."""
        f = self.path / "beats.npy"
        if not f.exists():
            raise FileNotFoundError(
                f"{self.path}: no beats.npy (a store written by an older ecgproto); run "
                "`ecgproto ingest` on its dataset again, which writes a new store with beats"
            )
        return np.load(f, mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray | None:
        f = self.path / "labels.npy"
        return np.load(f, mmap_mode="r") if f.exists() else None

    @property
    def key(self) -> str:
        return str(self.info["cache_key"])

    def rows(self, split: str | None = None) -> np.ndarray:
        m = self.manifest if split is None else self.manifest[self.manifest["split"] == split]
        return m["row"].to_numpy()
