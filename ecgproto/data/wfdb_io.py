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
from typing import BinaryIO, NamedTuple

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


class SignalSpec(NamedTuple):  # a tuple: a header holds a dozen and a dataset millions of them
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


def _hea(base: str) -> str:
    """The header file of a record base name (a '.dat' or other suffix given by mistake is replaced, as pathlib's
    with_suffix does)."""
    head, name = os.path.split(base)
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and suffix != "hea":
        return os.path.join(head, stem + ".hea")
    return base if suffix == "hea" and dot and stem else base + ".hea"


def read_header(base: Path | str) -> Header:
    """Parse `<base>.hea`. Raises RecordError for a missing file or a header wfdb would also refuse."""
    hea = _hea(os.fspath(base))
    with _open_regular(hea, "missing_header", "header file is missing; check the path or re-download the record") as f:
        text = f.read().decode("latin-1")
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


def _parse_signal_line(i: int, line: str, hea: str) -> SignalSpec:
    # file format[xN][:skew][+offset] gain[(baseline)][/units] adcres adczero initval checksum blocksize name
    tokens = line.split(maxsplit=8)
    fields = _signal_fields(
        tokens[1] if len(tokens) > 1 else "",
        tokens[2] if len(tokens) > 2 else None,
        tokens[4] if len(tokens) > 4 else "0",
    )
    if fields is None:
        raise RecordError("bad_header", f"unreadable signal line {i + 1}: {line!r}", hea)
    fmt, simple, gain, baseline, units = fields
    return SignalSpec(
        file=tokens[0],
        fmt=fmt,
        gain=gain,
        baseline=baseline,
        units=units,
        name=tokens[8].strip() if len(tokens) > 8 else f"signal{i}",
        simple=simple,
    )


@lru_cache(maxsize=4096)
def _signal_fields(
    fmt_token: str, gain_token: str | None, adczero_token: str
) -> tuple[str, bool, float, int, str] | None:
    """(format, simple, gain, baseline, units) of a signal line's format, gain and adczero fields; None if unreadable.
    Cached: a dataset's headers repeat a handful of these (the per-record fields, checksum and initial value, are
    not among them)."""
    fmt = _FORMAT.match(fmt_token)
    gain_m = _GAIN.match(gain_token) if gain_token is not None else None
    if fmt is None or (gain_token is not None and gain_m is None):
        return None
    try:
        adczero = int(adczero_token)
    except ValueError:
        return None
    gain = float(gain_m[1]) if gain_m else 200.0
    return (
        fmt[1],
        not fmt[2],
        gain if gain != 0 else 200.0,
        int(gain_m[2]) if gain_m and gain_m[2] else adczero,
        gain_m[3] if gain_m and gain_m[3] else "mV",
    )


def read_record(base: Path | str, root: Path | str | None = None, seconds: float | None = None) -> RawRecord:
    """Read a record's physical signal. Raises RecordError naming the file for any defect.

    `root`: every file the record reads (its header and each signal file, symlinks followed) must lie inside this
    folder, or the record is refused as `outside_root` (a dataset's index or header must not pull other files of the
    machine into a store). `seconds`: read only the first this many seconds (a Holter-length file is not read
    whole to keep 10 s; the rest of it is never touched)."""
    base = os.fspath(base)
    if root is not None:
        root = os.fspath(root)
        _inside(_hea(base), root)
    header = read_header(base)
    folder = os.path.dirname(base)
    files = {s.file for s in header.signals}
    if header.n_sig == 0:
        raise RecordError("no_signals", "header lists no signals", _hea(base))
    if root is not None:
        for name in files:
            _inside(os.path.join(folder, name), root)
    frames = None if seconds is None else max(int(np.ceil(seconds * header.fs)), 1)
    fast = len(files) == 1 and all(s.fmt == "16" and s.simple for s in header.signals)
    if not fast:
        for name in files:
            if not os.path.exists(os.path.join(folder, name)):
                raise RecordError(
                    "missing_dat", "signal file is missing; re-download the record", os.path.join(folder, name)
                )
        signal = _read_with_wfdb(Path(base), header, frames)
    else:
        signal = _read_format16(os.path.join(folder, header.signals[0].file), header, frames)
    return RawRecord(
        signal=signal,
        fs=header.fs,
        sig_names=tuple(s.name for s in header.signals),
        units=tuple(s.units for s in header.signals),
    )


def _open_regular(file: str, missing_reason: str, missing_message: str) -> BinaryIO:
    """Open a record file for reading; RecordError if it is missing or not a regular file (a pipe or device named
    by a record would otherwise block the read forever). O_NONBLOCK only affects such special files."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RecordError(missing_reason, missing_message, file) from None
    except IsADirectoryError:
        raise RecordError("unreadable", "is a folder, not a record file", file) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RecordError(
            "unreadable", "is not a regular file (a folder, pipe, socket or device); replace it with the record", file
        )
    return os.fdopen(fd, "rb")


def _read_format16(dat: str, header: Header, frames: int | None) -> np.ndarray:
    """One open, one fstat and one read of the frames wanted of a single-file format-16 record -> physical values."""
    with _open_regular(dat, "missing_dat", "signal file is missing; re-download the record") as f:
        size = os.fstat(f.fileno()).st_size
        expected = header.n_samples * header.n_sig * 2
        if header.n_samples and size < expected:
            raise RecordError(
                "truncated_dat",
                f"signal file has {size} bytes but the header needs {expected}; the download is incomplete, "
                "fetch the record again",
                dat,
            )
        n = header.n_samples or size // (2 * header.n_sig)
        n = n if frames is None else min(n, frames)
        digital = np.frombuffer(f.read(n * header.n_sig * 2), dtype="<i2").reshape(n, header.n_sig)
    gain = np.array([s.gain for s in header.signals], dtype=np.float32)
    baseline = np.array([s.baseline for s in header.signals], dtype=np.float32)
    signal = (digital.astype(np.float32) - baseline) / gain
    invalid = digital == _INVALID_16
    if invalid.any():
        signal[invalid] = np.nan
    return signal


@lru_cache(maxsize=16_384)
def _real_folder(folder: str) -> str:
    """A folder with every symlink followed; cached, since a dataset's records share a few thousand folders."""
    return os.path.realpath(folder)


def real_path(file: Path | str) -> str:
    """`file` with every symlink followed, as os.path.realpath, at one lstat per file: the file's folder is
    resolved once per folder; a '..' component or a file that is itself a link takes the full resolution."""
    text = os.fspath(file)
    if ".." in text.split(os.sep):
        return os.path.realpath(text)
    text = os.path.abspath(text)
    try:
        link = stat.S_ISLNK(os.lstat(text).st_mode)
    except OSError:
        link = False  # a missing file: its folder decides, and the read names it missing
    if link:
        return os.path.realpath(text)
    folder, name = os.path.split(text)
    return os.path.join(_real_folder(folder), name)


def is_inside(file: Path | str, root: Path | str) -> bool:
    """Does `file`, every symlink followed, lie inside `root` (itself resolved)?"""
    base = _real_folder(os.path.abspath(root))
    real = real_path(file)
    return real == base or real.startswith(base if base.endswith(os.sep) else base + os.sep)


def _inside(file: str, root: str) -> None:
    """Refuse a file that is not inside `root` once every symlink is followed (an absolute or '../' signal-file
    field in a header, or a header or signal file that is a link to elsewhere)."""
    if not is_inside(file, root):
        where = "a link to a file" if os.path.islink(file) else "a file"
        raise RecordError(
            "outside_root",
            f"{where} outside the dataset folder ({os.path.realpath(file)}); move the record into the folder, or "
            "allow this with --allow-outside-root",
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
