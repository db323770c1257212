"""External-cohort scoring throughput: ECGs/s on this machine's CPU or GPU, extrapolated to MIMIC-IV-ECG.

    python benchmarks/scale.py [--config reference|small] [--device cpu|cuda] [--n 32768]
                               [--batch 256,1024] [--workers 0,4] [--shard-size 4096]

Builds a store of --n synthetic 12-lead ECGs (10 s at 100 Hz, the model's input) and a network of
the chosen config (inference time does not depend on the weights' values), then scores the store:

  baseline  the plain loop: one batch of 256 read from the memmap, fp32, one process, no read-ahead
  loader    `ecgproto.scoring.score_rows`: DataLoader of whole-batch memmap slices with --workers
            read-ahead processes, pinned memory and bf16 autocast on CUDA; every batch/worker pair

and, for the fastest loader setting, the whole activation-store path (`score_store`, what `ecgproto score`
runs: float16 shards written atomically; on a CPU one single-threaded process per core, each scoring its
shards). Prints ECGs/s of each, the time for 800,000 ECGs (MIMIC-IV-ECG) by the activation-store path
(goal on one H100: < 10 minutes) and, last, `scoring_speedup_vs_plain_loop=<ratio>` of that path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ecgproto.data.beats import BeatConfig, Beats, grid_beats
from ecgproto.data.labels import load_label_set
from ecgproto.data.store import ArrayStore
from ecgproto.model.network import ECGProtoNet
from ecgproto.phenotype.features import prototype_table
from ecgproto.scoring import local_processes, score_rows, score_store
from ecgproto.train.config import PRESETS, TrainConfig, resolve_preset

MIMIC_ECGS = 800_000


def synthetic_store(path: Path, n: int, n_samples: int, seed: int = 0) -> ArrayStore:
    """A minimal valid store of n noisy sinusoid ECGs (float32), written block by block."""
    path.mkdir(parents=True)
    sig = np.lib.format.open_memmap(path / "signals.npy", mode="w+", dtype=np.float32, shape=(n, 12, n_samples))
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / 100.0
    for lo in range(0, n, 2048):
        hi = min(lo + 2048, n)
        hr = rng.uniform(0.8, 2.0, (hi - lo, 1, 1))
        sig[lo:hi] = np.sin(2 * np.pi * hr * t) + 0.1 * rng.standard_normal((hi - lo, 12, n_samples))
    sig.flush()
    # beat-scale windows on the fallback grid (sinusoids have no QRS to detect); real stores hold detected beats
    cfg = BeatConfig()
    np.save(path / "beats.npy", np.tile(Beats(grid_beats(n_samples, 100.0, cfg), "grid").padded(cfg.max_beats), (n, 1)))
    pd.DataFrame({"record_id": [f"s{i}" for i in range(n)], "row": np.arange(n), "split": "test"}).to_parquet(
        path / "manifest.parquet"
    )
    pd.DataFrame(columns=["record_id", "file", "reason", "message"]).to_parquet(path / "quarantine.parquet")
    (path / "store.json").write_text(json.dumps({"cache_key": f"synthetic-{n}-{seed}", "layout": "mimic_ecg"}))
    return ArrayStore.open(path)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def plain_loop(model: torch.nn.Module, store: ArrayStore, device: str, batch: int = 256) -> float:
    """ECGs/s of the straightforward loop: read a batch, run it in fp32, copy the result back."""
    model = model.eval().to(device)
    sig, beats = store.signals, store.beats
    _sync(device)
    t0 = time.perf_counter()
    for lo in range(0, len(sig), batch):
        x = torch.from_numpy(np.array(sig[lo : lo + batch], dtype=np.float32)).to(device)
        s = model.similarities(x, torch.from_numpy(np.array(beats[lo : lo + batch], dtype=np.int64)).to(device))
        torch.sigmoid(model.fusion(s)).cpu()
        s.cpu()
    _sync(device)
    return len(sig) / (time.perf_counter() - t0)


def loader_rate(model: torch.nn.Module, store: ArrayStore, device: str, batch: int, workers: int) -> float:
    rows = store.manifest["row"].to_numpy()
    score_rows(model, store, rows[: batch * 2], batch_size=batch, device=device, workers=0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    score_rows(model, store, rows, batch_size=batch, device=device, workers=workers)
    _sync(device)
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        choices=tuple(PRESETS),
        help="the configuration whose network is scored (default: what `--config auto` trains on this machine)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="ECGs in the synthetic store (default 32,768 on CPU, 100,000 on CUDA)")
    p.add_argument(
        "--shard-size", type=int, help="ECGs per activation-store shard (default 4,096 on CPU, 16,384 on CUDA)"
    )
    p.add_argument(
        "--batch", default="", help="comma-separated batch sizes (default 256 on CPU, 256,1024,2048 on CUDA)"
    )
    p.add_argument("--workers", default="", help="comma-separated loader worker counts (default 0 / 0,4,8)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.config = args.config or resolve_preset("auto", cuda)[0]
    n = args.n or (100_000 if cuda else 32_768)
    shard_size = args.shard_size or (16_384 if cuda else 4_096)
    batches = [int(b) for b in (args.batch or ("256,1024,2048" if cuda else "256")).split(",")]
    workers = [int(w) for w in (args.workers or ("0,4,8" if cuda else "0")).split(",")]
    torch.manual_seed(0)
    cfg = TrainConfig.preset(args.config).model
    model = ECGProtoNet(cfg, load_label_set()).eval()
    name = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads"
    print(
        f"device {args.device} ({name}), {args.config} config ({model.n_prototypes} prototypes), {n:,} synthetic ECGs"
    )
    scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-scale-"))
    try:
        t0 = time.perf_counter()
        store = synthetic_store(scratch / "store", n, cfg.n_samples)
        print(f"store written in {time.perf_counter() - t0:.1f} s ({store.signals.nbytes / 1e9:.2f} GB float32)")
        base = plain_loop(model, store, args.device)
        print(f"baseline plain loop (batch 256, fp32, no read-ahead): {base:,.0f} ECGs/s")
        best, best_at = 0.0, (batches[0], workers[0])
        sweep = len(batches) * len(workers) > 1  # one setting (the CPU default): the store path below measures it
        for b in batches if sweep else []:
            for w in workers:
                rate = loader_rate(model, store, args.device, b, w)
                print(f"loader batch {b:5d} workers {w}{' bf16' if cuda else ''}: {rate:,.0f} ECGs/s")
                if rate > best:
                    best, best_at = rate, (b, w)
        b, w = best_at
        t0 = time.perf_counter()
        acts = score_store(
            store,
            model,
            scratch / "activations",
            prototype_table(model),
            shard_size=shard_size,
            batch_size=b,
            device=args.device,
            workers=w,
        )
        whole = n / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in acts.path.iterdir()) / 1e6
        procs = local_processes(args.device, len(acts.info["shards"]))
        print(
            f"activation store (float16 shards of {shard_size:,}, batch {b}, workers {w}, {procs} scoring "
            f"process{'es' if procs > 1 else ''}): {whole:,.0f} ECGs/s incl. start-up and writing {size:.0f} MB"
        )
        print(
            f"{MIMIC_ECGS:,} ECGs (MIMIC-IV-ECG) at {whole:,.0f} ECGs/s: {MIMIC_ECGS / whole / 60:.1f} min "
            f"on this device (plain loop: {MIMIC_ECGS / base / 60:.1f} min)"
        )
        print(f"scoring_800k_minutes={MIMIC_ECGS / whole / 60:.2f}")
        print(f"scoring_speedup_vs_plain_loop={whole / base:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
