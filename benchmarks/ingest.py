"""Ingest throughput vs a naive per-record `wfdb.rdsamp` loop, on the same records, in one run.

    python benchmarks/ingest.py [--records 2000] [--real PATH] [--workers N] [--repeats 3]

Each side runs `--repeats` times, alternating, and its fastest run counts (as timeit does: a run is slowed by
whatever else the machine does, never sped up). Prints records/s of both, the cached re-run time, and as its
last line `ingest_speedup_vs_wfdb_loop=<ratio>` (demo records; with --real, the real PTB-XL subset too).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import wfdb

from ecgproto.data.demo.generate import DemoConfig, generate_demo
from ecgproto.data.ingest import IngestConfig, ingest


def naive_loop(root: Path) -> tuple[float, int]:
    db = pd.read_csv(root / "ptbxl_database.csv")
    t0 = time.perf_counter()
    for name in db["filename_lr"]:
        wfdb.rdsamp(str(root / name))
    return time.perf_counter() - t0, len(db)


def measure(name: str, root: Path, workers: int, scratch: Path, repeats: int) -> float:
    naive, fresh = [], []
    for i in range(repeats):
        naive_s, n = naive_loop(root)
        naive.append(naive_s)
        store = scratch / f"store-{name}-{i}"
        t0 = time.perf_counter()
        result = ingest(root, store, IngestConfig(workers=workers), progress=False)
        fresh.append(time.perf_counter() - t0)
        assert not result.cache_hit and result.n_records + result.n_quarantined >= n
    t0 = time.perf_counter()
    again = ingest(root, store, IngestConfig(workers=workers), progress=False)
    cached_s = time.perf_counter() - t0
    assert again.cache_hit
    naive_s, ingest_s = min(naive), min(fresh)
    speedup = naive_s / ingest_s
    print(
        f"[{name}] {n} records, best of {repeats}: wfdb.rdsamp loop {n / naive_s:,.0f} rec/s ({naive_s:.2f} s); "
        f"ingest (read+check+resample+filter+beats+store, {workers} workers) {n / ingest_s:,.0f} rec/s "
        f"({ingest_s:.2f} s; runs {', '.join(f'{t:.2f}' for t in fresh)} s); speed-up {speedup:.1f}x; "
        f"cached re-run {cached_s:.2f} s"
    )
    return speedup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; the fastest counts")
    p.add_argument("--real", type=Path, help="an unpacked PTB-XL folder (e.g. the shared 1,250-record subset)")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-"))
    try:
        demo = generate_demo(scratch / "demo", DemoConfig(n_ptbxl=args.records, n_hr=0, n_mimic_subjects=0))
        results = {}
        if args.real:
            results["real"] = measure("real PTB-XL subset", args.real.resolve(), args.workers, scratch, args.repeats)
        results["demo"] = measure("demo", demo.ptbxl, args.workers, scratch, args.repeats)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of the benchmark process: {peak_mb:.0f} MB")
        if "real" in results:
            print(f"ingest_speedup_vs_wfdb_loop_real_ptbxl={results['real']:.1f}")
        print(f"ingest_speedup_vs_wfdb_loop={results['demo']:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
