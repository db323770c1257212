"""Batched inference of a trained network over a memory-mapped store, and the activation store it writes.

Scoring reads the store through a torch DataLoader whose items are whole batches (one slice of the
memmap each, rows in file order), so loader workers read ahead while the model runs; on CUDA the
batches are pinned, copied asynchronously and run under bf16 autocast.

An activation store (a folder `activations-<key16>/`, published by one atomic rename) holds, per
scored ECG, the pooled prototype similarities and the fused label probabilities as float16 shards,
and, when the model carries its calibration (`ECGProtoNet.calibrated`), the calibrated probabilities
and how uncertain each prediction is (`ECGProtoNet.uncertainty`):

  similarities-000000.npy   (n_shard, P) float16
  probabilities-000000.npy  (n_shard, C) float16  as served (the F1 thresholds apply to these)
  calibrated-000000.npy     (n_shard, C) float16  calibrated probabilities (same ranks per label)
  uncertainty-000000.npy    (n_shard, 3) float32  total and epistemic uncertainty (bits per label) and
                                                   its percentile among the validation ECGs (0-100)
  records.parquet           position, row (in the ECG store), record_id, shard
  prototypes.parquet        one row per prototype: prototype, branch, class, index_in_branch, ...
  activations.json          the plan: store key, model id, shard and batch size, shapes, label codes

Shards are contiguous runs of the store's rows whose length is a multiple of the batch size, so
every batch holds the same ECGs however the shards are spread over machines: a sharded run on a
Dask cluster and a single-process run give the same arrays. A killed run keeps its finished
shards in `.partial-activations-<key16>/` and the next run with the same plan scores only the rest.

On a CPU, shards are scored by one process per core, each with one thread (`local_processes`): the
network's small convolutions use a second thread poorly, so two single-threaded processes on 2 cores
score ~1.2x the ECGs/s of one process with two threads in steady state (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ecgproto.data.store import ArrayStore, atomic_write_bytes, atomic_write_parquet, publish
from ecgproto.model import persist
from ecgproto.report import StageReport
from ecgproto.workers import die_with_parent

ACTIVATIONS_FORMAT = 2  # 2: calibrated probabilities and uncertainty beside the served probabilities
KINDS = ("similarities", "probabilities")
CALIBRATED_KINDS = ("calibrated", "uncertainty")
UNCERTAINTY_COLUMNS = ("uncertainty_bits", "epistemic_bits", "percentile")
_DTYPES = {"similarities": np.float16, "probabilities": np.float16, "calibrated": np.float16, "uncertainty": np.float32}


class _StoreBatches(Dataset):
    """Item i is batch i of `rows` (store rows, ascending): signals and beat positions, each read as one slice
    of the store's memmaps."""

    def __init__(self, store_path: Path, rows: np.ndarray, batch_size: int) -> None:
        self.path, self.rows, self.batch_size = store_path, rows, batch_size
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # opened lazily: each loader worker maps them

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            self._arrays = (
                np.load(self.path / "signals.npy", mmap_mode="r"),
                np.load(self.path / "beats.npy", mmap_mode="r"),
            )
        r = self.rows[i * self.batch_size : (i + 1) * self.batch_size]
        take = slice(r[0], r[-1] + 1) if len(r) and r[-1] - r[0] == len(r) - 1 else r  # consecutive: one read
        signals, beats = self._arrays
        return (
            torch.from_numpy(np.array(signals[take], dtype=np.float32)),  # private, writable copies
            torch.from_numpy(np.array(beats[take], dtype=np.int64)),
        )


def store_batches(
    store: ArrayStore, rows: np.ndarray, batch_size: int, device: str = "cpu", workers: int = 0
) -> DataLoader:
    """A DataLoader over `rows` (ascending) of `store`, one ((B, 12, n) float32, (B, K) beats) batch per item.

    Read-ahead workers are spawned, not forked: scoring often runs inside a Prefect flow or a Dask
    worker whose threads a forked child would inherit half-way (a second of start-up per worker)."""
    _ = store.beats  # a clear error here, not in a loader worker, for a store without beats
    return DataLoader(
        _StoreBatches(store.path, np.asarray(rows), batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
        multiprocessing_context="spawn" if workers else None,
    )


def score_rows(
    model: torch.nn.Module,
    store: ArrayStore,
    rows: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled similarities (n, P) and fused probabilities (n, C), float32, in the order of `rows`."""
    out = score_arrays(
        model, store, rows, batch_size=batch_size, device=device, workers=workers, progress=progress, desc=desc
    )
    return out["similarities"], out["probabilities"]


def calibrated_kinds(model: torch.nn.Module) -> tuple[str, ...]:
    """What scoring `model` yields: similarities and probabilities, and the calibrated kinds when it carries its
    calibration (models trained before ecgproto fitted one do not)."""
    return KINDS + (CALIBRATED_KINDS if bool(getattr(model, "calibrated", False)) else ())


@torch.no_grad()
def score_arrays(
    model: torch.nn.Module,
    store: ArrayStore,
    rows: np.ndarray,
    *,
    kinds: tuple[str, ...] = KINDS,
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "scoring",
) -> dict[str, np.ndarray]:
    """The `kinds` of every ECG at `rows`, float32, in the order of `rows`: similarities (n, P), probabilities
    (n, C) and, from a calibrated model, calibrated (n, C) and uncertainty (n, 3: UNCERTAINTY_COLUMNS)."""
    if unknown := set(kinds) - set(KINDS + CALIBRATED_KINDS):
        raise ValueError(f"unknown score kinds {sorted(unknown)}; choose from {KINDS + CALIBRATED_KINDS}")
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")  # read the memmap front to back
    model = model.eval().to(device)
    n = len(rows)
    width = {"similarities": model.n_prototypes, "probabilities": len(model.codes), "calibrated": len(model.codes)}
    out = {k: np.empty((n, width.get(k, len(UNCERTAINTY_COLUMNS))), dtype=np.float32) for k in kinds}
    cuda = device.startswith("cuda")
    lo = 0
    for x, beats in tqdm(
        store_batches(store, rows[order], batch_size, device, workers), desc=desc, unit="batch", disable=not progress
    ):
        xt = x.to(device, non_blocking=cuda)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            s = model.similarities(xt, beats.to(device, non_blocking=cuda))
            got = {"similarities": s, "probabilities": torch.sigmoid(model.fusion(s))}
        if "calibrated" in kinds or "uncertainty" in kinds:  # in float32: entropies of probabilities near 0 or 1
            u = model.uncertainty(s.float())
            got["calibrated"] = u["probability"]
            got["uncertainty"] = torch.stack([u["uncertainty"], u["epistemic"], u["percentile"]], dim=1)
        take = order[lo : lo + len(x)]
        for k in kinds:
            out[k][take] = got[k].float().cpu().numpy()
        lo += len(x)
    return out


def model_id(model: torch.nn.Module) -> str:
    """Content hash of a network's weights: what decides its activations."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ScoringPlan:
    """Which rows go in which shard, where the shards are written and where they will be published."""

    store_path: str
    partial: str
    final: str
    key: str
    rows: tuple[tuple[int, int], ...]  # per shard: [start, end) positions into the store's manifest rows
    batch_size: int
    model: str  # model_id of the network
    kinds: tuple[str, ...] = KINDS  # the arrays of each shard (calibrated_kinds of the model)

    @property
    def n_shards(self) -> int:
        return len(self.rows)

    def shard_files(self, i: int) -> tuple[Path, ...]:
        """Shard i's files, one per kind in `kinds` order (similarities first)."""
        p = Path(self.partial)
        return tuple(p / f"{kind}-{i:06d}.npy" for kind in self.kinds)

    def done(self, i: int) -> bool:
        return all(f.exists() for f in self.shard_files(i))

    def pending(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.done(i)]


def plan_scoring(
    store: ArrayStore, model: torch.nn.Module, out_root: Path | str, *, shard_size: int = 65_536, batch_size: int = 256
) -> ScoringPlan:
    """Plan the activation store of `model` on every usable record of `store` (resumes a killed run)."""
    shard_size = max(batch_size, shard_size // batch_size * batch_size)
    mid = model_id(model)
    key = hashlib.sha256(
        json.dumps(
            {
                "format": ACTIVATIONS_FORMAT,
                "store": store.key,
                "model": mid,
                "shard_size": shard_size,
                "batch_size": batch_size,
            }
        ).encode()
    ).hexdigest()
    out_root = Path(out_root).resolve()
    final, partial = out_root / f"activations-{key[:16]}", out_root / f".partial-activations-{key[:16]}"
    n = len(store.manifest)
    bounds = tuple((lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size))
    plan = ScoringPlan(str(store.path), str(partial), str(final), key, bounds, batch_size, mid, calibrated_kinds(model))
    if not (final / "activations.json").exists():
        marker = partial / "plan.json"
        if not (marker.exists() and json.loads(marker.read_text()).get("key") == key):
            if partial.exists():
                for f in partial.iterdir():
                    f.unlink()
            partial.mkdir(parents=True, exist_ok=True)
            persist.save(model.cpu(), partial / "model.pt")  # what every worker loads (weights + description)
            atomic_write_bytes(marker, json.dumps({"key": key}).encode())
    return plan


def score_shard(
    plan: ScoringPlan, i: int, *, device: str = "cpu", workers: int = 0, model: torch.nn.Module | None = None
) -> int:
    """Score shard i of `plan` and write its arrays (one per kind) atomically; returns its ECG count."""
    if plan.done(i):
        return plan.rows[i][1] - plan.rows[i][0]
    store = ArrayStore.open(plan.store_path)
    if model is None:
        model = persist.load(Path(plan.partial) / "model.pt")
    lo, hi = plan.rows[i]
    rows = np.sort(store.manifest["row"].to_numpy())[lo:hi]
    arrays = score_arrays(
        model, store, rows, kinds=plan.kinds, batch_size=plan.batch_size, device=device, workers=workers
    )
    for path, kind in zip(plan.shard_files(i), plan.kinds, strict=True):
        buf = io.BytesIO()
        np.save(buf, arrays[kind].astype(_DTYPES[kind]))
        atomic_write_bytes(path, buf.getvalue())
    return hi - lo


def finish_scoring(plan: ScoringPlan, prototypes: pd.DataFrame, codes: tuple[str, ...]) -> ActivationStore:
    """Write the record and prototype tables and the plan, then publish the store."""
    final = Path(plan.final)
    if (final / "activations.json").exists():
        return ActivationStore.open(final)
    if missing := plan.pending():
        raise RuntimeError(f"{plan.partial}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} not scored")
    partial = Path(plan.partial)
    store = ArrayStore.open(plan.store_path)
    m = store.manifest.sort_values("row").reset_index(drop=True)
    shard = np.zeros(len(m), dtype=np.int32)
    for i, (lo, hi) in enumerate(plan.rows):
        shard[lo:hi] = i
    atomic_write_parquet(
        pd.DataFrame(
            {
                "position": np.arange(len(m)),
                "row": m["row"].to_numpy(),
                "record_id": m["record_id"].astype(str).to_numpy(),
                "shard": shard,
            }
        ),
        partial / "records.parquet",
    )
    atomic_write_parquet(prototypes, partial / "prototypes.parquet")
    n_p = np.load(plan.shard_files(0)[0], mmap_mode="r").shape[1] if plan.rows else len(prototypes)
    info = {
        "format": ACTIVATIONS_FORMAT,
        "key": plan.key,
        "store": store.key,
        "model": plan.model,
        "store_path": plan.store_path,
        "n": int(len(m)),
        "n_prototypes": int(n_p),
        "codes": list(codes),
        "dtype": "float16",
        "kinds": list(plan.kinds),
        "batch_size": plan.batch_size,
        "shards": [list(b) for b in plan.rows],
    }
    (partial / "model.pt").unlink(missing_ok=True)
    (partial / "plan.json").unlink(missing_ok=True)
    atomic_write_bytes(partial / "activations.json", json.dumps(info, indent=2).encode())
    publish(partial, final)
    return ActivationStore.open(final)


ShardRunner = Callable[[ScoringPlan, list[int]], None]


def score_store(
    store: ArrayStore,
    model: torch.nn.Module,
    out_root: Path | str,
    prototypes: pd.DataFrame,
    *,
    shard_size: int = 65_536,
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 0,
    run_shards: ShardRunner | None = None,
    processes: int = 0,
    progress: bool = False,
) -> ActivationStore:
    """Score every record of `store` into an activation store; `run_shards` may spread the shards out
    (e.g. Prefect tasks on a Dask cluster). By default they run here: on a CPU in `processes` processes
    (0: one per core; 1: this process, one shard after the other), on CUDA one after the other."""
    plan = plan_scoring(store, model, out_root, shard_size=shard_size, batch_size=batch_size)
    if not (Path(plan.final) / "activations.json").exists():
        pending = plan.pending()
        if run_shards is not None:
            run_shards(plan, pending)
        else:
            score_shards_here(
                plan, pending, device=device, workers=workers, processes=processes, model=model, progress=progress
            )
    return finish_scoring(plan, prototypes, tuple(model.codes))


def score_shards_here(
    plan: ScoringPlan,
    pending: list[int],
    *,
    device: str = "cpu",
    workers: int = 0,
    processes: int = 0,
    model: torch.nn.Module | None = None,
    progress: bool = False,
) -> None:
    """Score `pending` shards on this machine: on a CPU in `local_processes` processes, else (or for one shard)
    in this process one after the other."""
    n_proc = local_processes(device, len(pending), processes)
    if n_proc > 1:
        _score_in_processes(plan, pending, n_proc, workers, progress)
        return
    for i in tqdm(pending, desc="scoring shards", unit="shard", disable=not progress):
        score_shard(plan, i, device=device, workers=workers, model=model)


def cpu_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes(device: str, pending: int, requested: int = 0) -> int:
    """How many processes score `pending` shards here: on CUDA one (the GPU is the bottleneck); on a CPU
    `requested`, or with 0 one per core, never more than there are shards."""
    if not device.startswith("cpu") or pending < 2:
        return 1
    return max(1, min(pending, requested if requested > 0 else cpu_cores()))


def _scoring_worker(parent: int, threads: int) -> None:
    """Process-pool initializer: die with the scoring process (no orphan after a kill) and use `threads` threads."""
    die_with_parent(parent)
    torch.set_num_threads(threads)


def _score_in_processes(plan: ScoringPlan, pending: list[int], processes: int, workers: int, progress: bool) -> None:
    """Score `pending` shards in `processes` spawned processes with an equal share of the cores each; every
    process loads the plan's saved model (persist.load: weights and description, nothing unpickled)."""
    threads = max(1, cpu_cores() // processes)
    with ProcessPoolExecutor(
        max_workers=processes,
        mp_context=mp.get_context("spawn"),  # not fork: torch's thread pools do not survive a fork
        initializer=_scoring_worker,
        initargs=(os.getpid(), threads),
    ) as pool:
        futures = [pool.submit(score_shard, plan, i, device="cpu", workers=workers) for i in pending]
        for future in tqdm(
            as_completed(futures), total=len(futures), desc="scoring shards", unit="shard", disable=not progress
        ):
            future.result()


def scoring_report(
    acts: ActivationStore, seconds: float, shards_scored: int, lineage: dict[str, str], params: dict[str, object]
) -> StageReport:
    """What the `score` MLflow run shows: the plan, counts and rate; no record ids."""
    info = acts.info
    report = StageReport(
        params={**params, "activations_path": str(acts.path), **lineage},
        metrics={
            "n_scored": info["n"],
            "n_prototypes": info["n_prototypes"],
            "n_shards": len(info["shards"]),
            "shards_scored_now": shards_scored,
            "seconds": seconds,
        },
        tags={
            "activations_key": info["key"][:16],
            "cache_hit": str(not shards_scored).lower(),
            "calibrated": str("calibrated" in acts.kinds).lower(),  # calibrated probabilities and uncertainty stored
            **{k: v for k, v in lineage.items() if k in ("model_version", "train_run_id")},
        },
    )
    if shards_scored:
        report.metrics["ecgs_per_s"] = info["n"] / seconds
    return report


@dataclass
class ActivationStore:
    """A published activation store, read shard by shard (memory-mapped) or whole."""

    path: Path

    @classmethod
    def open(cls, path: Path | str) -> ActivationStore:
        path = Path(path)
        if not (path / "activations.json").exists():
            raise FileNotFoundError(f"{path}: not an activation store (no activations.json); run `ecgproto score`")
        return cls(path)

    @cached_property
    def info(self) -> dict:
        return json.loads((self.path / "activations.json").read_text())

    @cached_property
    def records(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "records.parquet")

    @cached_property
    def prototypes(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "prototypes.parquet")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The arrays it holds (a store of format 1 holds similarities and probabilities only)."""
        return tuple(self.info.get("kinds", KINDS))

    def shards(self, kind: str = "similarities") -> Iterator[np.ndarray]:
        if kind not in self.kinds:
            raise ValueError(
                f"{self.path}: holds no {kind} (it has {', '.join(self.kinds)}): it was scored by a model without "
                "calibration or by an older ecgproto; score the store again with a model trained by this version"
            )
        for i in range(len(self.info["shards"])):
            yield np.load(self.path / f"{kind}-{i:06d}.npy", mmap_mode="r")

    def take(self, positions: np.ndarray, kind: str = "similarities") -> np.ndarray:
        """float32 rows at `positions` (into `records`), read shard by shard from the memmaps."""
        positions = np.asarray(positions)
        out: np.ndarray | None = None
        for (lo, hi), arr in zip(self.info["shards"], self.shards(kind), strict=True):
            if out is None:
                out = np.empty((len(positions), arr.shape[1]), dtype=np.float32)
            mine = (positions >= lo) & (positions < hi)
            if mine.any():
                out[mine] = arr[positions[mine] - lo]
        return out if out is not None else np.zeros((len(positions), 0), np.float32)

    def matrix(self, kind: str = "similarities") -> np.ndarray:
        """(n, P), (n, C) float16 or (n, 3) float32 (uncertainty), rows in the order of `records`."""
        return (
            np.concatenate(list(self.shards(kind)), axis=0) if self.info["shards"] else np.zeros((0, 0), _DTYPES[kind])
        )
