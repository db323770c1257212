"""Time of a full reference training at PTB-XL size on one device, from every stage timed through the real code.

    python benchmarks/train_ptbxl_size.py PTBXL_DIR [--device cuda] [--epochs 1] [--typical]

Ingests an unpacked PTB-XL folder (e.g. the 1,250-record subset), tiles its records to PTB-XL's split
sizes (17,418 / 2,183 / 2,198 records) and runs every stage of the reference config, the black box
included, for --epochs epochs (memmap reads, validation each epoch, projection over the whole
training split, evaluation with bootstrap CIs), timing each; from those it prints the time of a
full training at the config's epoch limits (the upper bound). With --typical it first trains the
reference config on the folder itself (benchmarks/train_accuracy.py's run) and also extrapolates
at the median epochs early stopping took there.

Last line: `ptbxl_size_full_training_min=<minutes> baseline_min=<minutes of the black box in it>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from _common import PTBXL_SPLITS, default_device, ingest_real, set_threads
from _common import sync as _sync

from ecgproto.data.store import ArrayStore
from ecgproto.train.config import TrainConfig


def tile_store(src: ArrayStore, dst: Path, sizes: dict[str, int]) -> ArrayStore:
    """A store of `sizes` records per split made by repeating `src`'s records of that split."""
    parts = []
    for split, n in sizes.items():
        rows = src.manifest[src.manifest["split"] == split]
        copy = np.arange(n) // len(rows)
        part = rows.iloc[np.arange(n) % len(rows)].copy()
        part["record_id"] = part["record_id"].astype(str) + "~" + copy.astype(str)
        parts.append(part)
    m = pd.concat(parts, ignore_index=True)
    dst.mkdir(parents=True)
    sig = np.lib.format.open_memmap(
        dst / "signals.npy", mode="w+", dtype=src.signals.dtype, shape=(len(m), *src.signals.shape[1:])
    )
    assert src.labels is not None
    lab = np.empty((len(m), src.labels.shape[1]), dtype=src.labels.dtype)
    for i in range(0, len(m), 4096):
        rows = m["row"].to_numpy()[i : i + 4096]
        sig[i : i + len(rows)] = src.signals[rows]
        lab[i : i + len(rows)] = src.labels[rows]
    sig.flush()
    np.save(dst / "labels.npy", lab)
    np.save(dst / "beats.npy", np.asarray(src.beats)[m["row"].to_numpy()])
    m["row"] = np.arange(len(m))
    m.to_parquet(dst / "manifest.parquet")
    src.quarantine.to_parquet(dst / "quarantine.parquet")
    info = {**src.info, "cache_key": f"{src.key}-tiled-{len(m)}", "n_records": len(m), "shape": list(sig.shape)}
    (dst / "store.json").write_text(json.dumps(info))
    return ArrayStore.open(dst)


def ptbxl_size_timing(
    store: ArrayStore, scratch: Path, device: str, epochs: int, typical: dict[str, float]
) -> tuple[float, float]:
    """Seconds of a full reference training at PTB-XL size, extrapolated from timed stage epochs, and the
    black box's share of them."""
    from ecgproto.train import stages

    big = tile_store(store, scratch / "ptbxl-size", PTBXL_SPLITS)
    cfg = TrainConfig()
    cfg.device = device
    limits = {
        "joint": cfg.joint.epochs,
        "last_layer": cfg.last_layer.epochs,
        "fusion": cfg.fusion.epochs,
        "baseline": cfg.baseline.stage.epochs,
    }
    for stage in (cfg.joint, cfg.last_layer, cfg.fusion, cfg.baseline.stage):
        stage.epochs = epochs
    ctx = stages.TrainContext.open(big.path, cfg, scratch / "work-ptbxl-size")
    _ = ctx.splits, ctx.pos_weight, ctx.jaccard
    timed: dict[str, float] = {}

    def clock(key: str, fn: Callable[..., object], *args: object) -> None:
        _sync(ctx.device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(ctx.device)
        timed[key] = time.perf_counter() - t0

    for step in stages.plan(cfg):
        clock(step.key, stages.run_step, ctx, step)
    clock("evaluate", stages.evaluate, ctx, "test")
    n = {s: len(ctx.splits[s]) for s in ("train", "val", "test")}
    print(
        f"[ptbxl-size] {n['train']:,}/{n['val']:,}/{n['test']:,} records, reference config, {epochs} epoch(s) "
        f"per stage on {ctx.device}:"
    )
    for key, sec in timed.items():
        print(f"[ptbxl-size]   {key:32s} {sec:8.1f} s")

    def total(epochs_of: dict[str, float]) -> float:
        per_epoch = {k: timed[k] / epochs for k in timed if not k.startswith(("projection", "evaluate"))}
        t = sum(timed[k] for k in timed if k.startswith(("projection", "evaluate")))
        for k, sec in per_epoch.items():
            t += sec * epochs_of[k.split(".")[0]]
        return t

    upper = total({k: float(v) for k, v in limits.items()})
    print(f"[ptbxl-size] full training at the epoch limits ({limits}): {upper / 3600:.2f} h (upper bound)")
    if typical:
        epochs_of = {k: typical.get(k, float(limits[k])) for k in limits}
        est = total(epochs_of)
        shown = {k: round(v, 1) for k, v in typical.items()}
        print(
            f"[ptbxl-size] full training at the epochs early stopping took on the real folder ({shown}): "
            f"{est / 60:.1f} min"
        )
        return est, timed["baseline"] / epochs * epochs_of["baseline"]
    return upper, timed["baseline"] / epochs * limits["baseline"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("real", type=Path, help="an unpacked PTB-XL folder (e.g. the 1,250-record subset)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--epochs", type=int, default=1, help="epochs per stage timed")
    p.add_argument(
        "--typical",
        action="store_true",
        help="also train the reference config on the folder and extrapolate at the epochs early stopping took",
    )
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    set_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-ptbxl-size-"))
    try:
        typical: dict[str, float] = {}
        if args.typical:
            from train_accuracy import real_data_accuracy

            _, store, typical = real_data_accuracy(args.real.resolve(), scratch, args.device, "reference")
        else:
            store = ingest_real(args.real.resolve(), scratch)
        total_s, baseline_s = ptbxl_size_timing(store, scratch, args.device, args.epochs, typical)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"ptbxl_size_full_training_min={total_s / 60:.1f} baseline_min={baseline_s / 60:.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
