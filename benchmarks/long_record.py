"""Memory and time of reading a Holter-length record: ecgproto reads the window it keeps, not the whole file.

    python benchmarks/long_record.py [--hours 2] [--fs 1000]

Writes a WFDB folder with one 12-lead record of --hours at --fs Hz (format 16: 173 MB for 2 h at
1,000 Hz) and one 10 s record, then measures, each in a fresh process: the peak RSS and time of
`ecgproto ingest` of the folder (one worker) and of `ecgproto.data.wfdb_io.read_record` of the long
record with the window ingest keeps, against the baseline in the same run, `wfdb.rdsamp` of the
whole record (what ingest did before it read windows). The 10 s record alone is the floor: a
bounded read keeps the long record's ingest near it.

Last line: `long_record_ingest_rss_mb=<MB> short_record_ingest_rss_mb=<MB> whole_read_rss_mb=<MB>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def write_record(folder: Path, name: str, seconds: float, fs: int, chunk_s: int = 60) -> int:
    """A format-16 WFDB record of `seconds` written in chunks (never whole in memory); returns its .dat bytes."""
    n = int(seconds * fs)
    rng = np.random.default_rng(0)
    t = np.arange(chunk_s * fs) / fs
    beat = (1000 * np.exp(-(((t % 0.8) - 0.2) ** 2) / 0.0005)).astype(np.int16)  # an R wave every 0.8 s
    with open(folder / f"{name}.dat", "wb") as f:
        for start in range(0, n, chunk_s * fs):
            m = min(chunk_s * fs, n - start)
            block = beat[:m, None] + rng.integers(-20, 20, (m, len(LEADS)), dtype=np.int16)
            f.write(block.astype("<i2").tobytes())
    lines = [f"{name} {len(LEADS)} {fs} {n}"]
    lines += [f"{name}.dat 16 1000/mV 16 0 0 0 0 {lead}" for lead in LEADS]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    return n * len(LEADS) * 2


PROBE = r"""
import json, resource, sys, time
kind, arg = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
if kind == "window":
    from ecgproto.data.ingest import READ_MARGIN_S, IngestConfig
    from ecgproto.data.wfdb_io import read_record
    keep = IngestConfig().preprocess.duration_s + READ_MARGIN_S
    read_record(arg[0], seconds=keep)
elif kind == "whole":
    import wfdb
    wfdb.rdsamp(arg[0])
else:
    import subprocess
    subprocess.run(arg, check=True, stdout=subprocess.DEVNULL)
seconds = time.perf_counter() - t0
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"rss_mb": peak / 1024, "seconds": seconds}))
"""


def probe(kind: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, kind, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ingest_probe(folder: Path, store: Path) -> dict[str, float]:
    cli = str(Path(sys.executable).with_name("ecgproto"))
    command = [cli, "ingest", str(folder), "--layout", "wfdb", "--store", str(store), "--workers", "1"]
    return probe("ingest", *command)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--fs", type=int, default=1000)
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-long-"))
    try:
        short, long = scratch / "short", scratch / "long"
        short.mkdir()
        long.mkdir()
        write_record(short, "ten_seconds", 10, args.fs)
        write_record(long, "ten_seconds", 10, args.fs)
        size = write_record(long, "holter", args.hours * 3600, args.fs)
        print(f"[long] a {args.hours:g} h {args.fs} Hz 12-lead record: {size / 1e6:.0f} MB of signal", flush=True)
        window = probe("window", str(long / "holter"))
        whole = probe("whole", str(long / "holter"))
        floor = ingest_probe(short, scratch / "store-short")
        ingest = ingest_probe(long, scratch / "store-long")
        for name, r in (
            ("read_record, the window ingest keeps", window),
            ("wfdb.rdsamp, the whole record", whole),
            ("ecgproto ingest, one 10 s record", floor),
            ("ecgproto ingest, + the long record", ingest),
        ):
            print(f"[long]   {name:38s} peak RSS {r['rss_mb']:7.0f} MB  {r['seconds']:6.2f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"long_record_ingest_rss_mb={ingest['rss_mb']:.0f} short_record_ingest_rss_mb={floor['rss_mb']:.0f} "
        f"whole_read_rss_mb={whole['rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
