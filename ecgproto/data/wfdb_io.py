"""Reading WFDB records: a fast path for single-file format-16 records, wfdb itself for the rest.

PTB-XL and MIMIC-IV-ECG are single-file format 16; parsing that header and memory-reading the .dat
is ~100x faster than `wfdb.rdsamp` and returns the same physical values (tested against wfdb).
Every failure is a RecordError that names the file and says what is wrong.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Bytes per sample of the formats whose file size we can check before reading.
_BYTES_PER_SAMPLE = {"16": 2.0, "61": 2.0, "212": 1.5, "24": 3.0, "32": 4.0, "80": 1.0, "8": 1.0}
_INVALID_16 = -32768  # WFDB's "no sample" value in format 16
_FORMAT = re.compile(r"^(\d+)(.*)$")
_GAIN = re.compile(r"^([-+\d.eE]+)(?:\((-?\d+)\))?(?:/(\S+))?$")


class RecordError(Exception):
    """A record that cannot be used. `reason` is a short machine-readable class, `file` the culprit."""

    def __init__(self, reason: str, message: str, file: Path | str):
        super().__init__(f"{file}: {message}")
        self.reason = reason
        self.message = message
        self.file = str(file)


@dataclass(frozen=True)
class SignalSpec:
    file: str
    fmt: str
    gain: float
    baseline: int
    units: str
    name: str
    simple: bool  # no skew, offset or multiple samples per frame


@dataclass(frozen=True)
class Header:
    record_name: str
    n_sig: int
    fs: float
    n_samples: int
    signals: tuple[SignalSpec, ...]


@dataclass(frozen=True)
class RawRecord:
    signal: np.ndarray  # (n_samples, n_sig) float32, physical units
    fs: float
    sig_names: tuple[str, ...]
    units: tuple[str, ...]


def read_header(base: Path) -> Header:
    """Parse `<base>.hea`. Raises RecordError for a missing file or a header wfdb would also refuse."""
    hea = base.with_suffix(".hea") if base.suffix != ".hea" else base
    try:
        text = hea.read_text(encoding="latin-1")
    except FileNotFoundError:
        raise RecordError(
            "missing_header", "header file is missing; check the path or re-download the record", hea
        ) from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise RecordError("bad_header", "header file is empty", hea)
    record = lines[0].split()
    if "/" in record[0]:
        raise RecordError("unsupported", "multi-segment records are not supported", hea)
    try:
        n_sig = int(record[1])
        fs = float(record[2].split("/")[0].split("(")[0]) if len(record) > 2 else 250.0
        n_samples = int(record[3]) if len(record) > 3 else 0
    except (IndexError, ValueError):
        raise RecordError("bad_header", f"unreadable record line {lines[0]!r}", hea) from None
    signal_lines = lines[1:]
    if len(signal_lines) != n_sig:
        raise RecordError(
            "signal_count_mismatch",
            f"header declares {n_sig} signals but describes {len(signal_lines)}; the header is corrupt, "
            "re-download the record",
            hea,
        )
    signals = tuple(_parse_signal_line(i, line, hea) for i, line in enumerate(signal_lines))
    return Header(record[0], n_sig, fs, n_samples, signals)


def _parse_signal_line(i: int, line: str, hea: Path) -> SignalSpec:
    # file format[xN][:skew][+offset] gain[(baseline)][/units] adcres adczero initval checksum blocksize name
    tokens = line.split(maxsplit=8)
    fmt = _FORMAT.match(tokens[1]) if len(tokens) > 1 else None
    gain_m = _GAIN.match(tokens[2]) if len(tokens) > 2 else None
    if fmt is None or (len(tokens) > 2 and gain_m is None):
        raise RecordError("bad_header", f"unreadable signal line {i + 1}: {line!r}", hea)
    try:
        adczero = int(tokens[4]) if len(tokens) > 4 else 0
    except ValueError:
        raise RecordError("bad_header", f"unreadable signal line {i + 1}: {line!r}", hea) from None
    gain = float(gain_m[1]) if gain_m else 200.0
    return SignalSpec(
        file=tokens[0],
        fmt=fmt[1],
        gain=gain if gain != 0 else 200.0,
        baseline=int(gain_m[2]) if gain_m and gain_m[2] else adczero,
        units=(gain_m[3] if gain_m and gain_m[3] else "mV"),
        name=tokens[8].strip() if len(tokens) > 8 else f"signal{i}",
        simple=not fmt[2],
    )


def read_record(base: Path | str, root: Path | str | None = None, seconds: float | None = None) -> RawRecord:
    """Read a record's physical signal. Raises RecordError naming the file for any defect.

    `root`: every file the record reads (its header and each signal file, symlinks followed) must lie inside this
    folder, or the record is refused as `outside_root` (a dataset's index or header must not pull other files of the
    machine into a store). `seconds`: read only the first this many seconds (a Holter-length file is not read
    whole to keep 10 s; the rest of it is never touched)."""
    base = Path(base)
    if root is not None:
        _inside(base.with_suffix(".hea") if base.suffix != ".hea" else base, Path(root))
    header = read_header(base)
    files = {s.file for s in header.signals}
    for name in files:
        dat = base.parent / name
        if root is not None:
            _inside(dat, Path(root))
        if not dat.exists():
            raise RecordError("missing_dat", "signal file is missing; re-download the record", dat)
    if header.n_sig == 0:
        raise RecordError("no_signals", "header lists no signals", base.with_suffix(".hea"))
    frames = None if seconds is None else max(int(np.ceil(seconds * header.fs)), 1)
    fast = len(files) == 1 and all(s.fmt == "16" and s.simple for s in header.signals)
    if fast:
        dat = base.parent / header.signals[0].file
        expected = header.n_samples * header.n_sig * 2
        size = dat.stat().st_size
        if header.n_samples and size < expected:
            raise RecordError(
                "truncated_dat",
                f"signal file has {size} bytes but the header needs {expected}; the download is incomplete, "
                "fetch the record again",
                dat,
            )
        n = header.n_samples or size // (2 * header.n_sig)
        n = n if frames is None else min(n, frames)
        digital = np.fromfile(dat, dtype="<i2", count=n * header.n_sig).reshape(n, header.n_sig)
        gain = np.array([s.gain for s in header.signals], dtype=np.float32)
        baseline = np.array([s.baseline for s in header.signals], dtype=np.float32)
        signal = (digital.astype(np.float32) - baseline) / gain
        signal[digital == _INVALID_16] = np.nan
    else:
        signal = _read_with_wfdb(base, header, frames)
    return RawRecord(
        signal=signal,
        fs=header.fs,
        sig_names=tuple(s.name for s in header.signals),
        units=tuple(s.units for s in header.signals),
    )


@lru_cache(maxsize=16_384)
def _real_folder(folder: str) -> str:
    """A folder with every symlink followed; cached, since a dataset's records share a few thousand folders."""
    return os.path.realpath(folder)


def real_path(file: Path | str) -> str:
    """`file` with every symlink followed, as os.path.realpath, at one lstat per file: the file's folder is
    resolved once per folder; a '..' component or a file that is itself a link takes the full resolution."""
    text = os.path.abspath(file) if ".." not in Path(file).parts else os.path.realpath(file)
    folder, name = os.path.split(text)
    try:
        link = stat.S_ISLNK(os.lstat(text).st_mode)
    except OSError:
        link = False  # a missing file: its folder decides, and the read names it missing
    return os.path.realpath(text) if link else os.path.join(_real_folder(folder), name)


def is_inside(file: Path | str, root: Path | str) -> bool:
    """Does `file`, every symlink followed, lie inside `root` (itself resolved)?"""
    base = _real_folder(os.path.abspath(root))
    return Path(real_path(file)).is_relative_to(base)


def _inside(file: Path, root: Path) -> None:
    """Refuse a file that is not inside `root` once every symlink is followed (an absolute or '../' signal-file
    field in a header, or a header or signal file that is a link to elsewhere)."""
    if not is_inside(file, root):
        where = "a link to a file" if file.is_symlink() else "a file"
        raise RecordError(
            "outside_root",
            f"{where} outside the dataset folder ({file.resolve()}); move the record into the folder, or allow this "
            "with --allow-outside-root",
            file,
        )


def _read_with_wfdb(base: Path, header: Header, frames: int | None = None) -> np.ndarray:
    import wfdb  # imported lazily: only unusual formats need it

    for name in {s.file for s in header.signals}:
        bps = _BYTES_PER_SAMPLE.get(next(s.fmt for s in header.signals if s.file == name))
        n_in_file = sum(1 for s in header.signals if s.file == name)
        dat = base.parent / name
        if bps and header.n_samples and dat.stat().st_size < int(header.n_samples * n_in_file * bps):
            raise RecordError(
                "truncated_dat", "signal file is shorter than the header says; fetch the record again", dat
            )
    try:
        sampto = None if frames is None or not header.n_samples else min(frames, header.n_samples)
        record = wfdb.rdrecord(str(base), physical=True, sampto=sampto)
    except Exception as exc:  # wfdb raises many types for corrupt files
        raise RecordError(
            "unreadable", f"wfdb could not read the record ({type(exc).__name__}: {exc})", base.with_suffix(".hea")
        ) from None
    return np.asarray(record.p_signal, dtype=np.float32)
