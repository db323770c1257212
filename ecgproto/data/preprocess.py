"""Turn a raw record into the model's input: lead order, rate, length, finite values, baseline removed.

Quality problems raise QualityError (a RecordError) so the ingest can quarantine the record.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import signal as sps

from ecgproto.data.leads import LEADS, LeadError, lead_permutation
from ecgproto.data.wfdb_io import RawRecord, RecordError


class PreprocessConfig(BaseModel):
    """How raw signals become model input. Part of the store's cache key."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    fs: int = Field(100, description="model sampling rate (Hz)")
    duration_s: float = Field(10.0, description="window length; longer records are cropped from the start")
    allow_resample: bool = Field(True, description="polyphase-resample other rates to fs; else quarantine them")
    highpass_hz: float | None = Field(0.5, description="zero-phase Butterworth high-pass corner; None: off")
    highpass_order: int = 1
    max_nan_fraction: float = Field(0.02, description="per lead; shorter NaN gaps are linearly interpolated")
    flat_ptp_mv: float = Field(0.01, description="a lead whose peak-to-peak is below this is flat")
    dtype: Literal["float32", "float16"] = "float32"

    @property
    def n_samples(self) -> int:
        return int(round(self.fs * self.duration_s))


class QualityError(RecordError):
    pass


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along axis 0 (anti-aliased, no phase shift)."""
    if fs_in == fs_out:
        return x
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)


@lru_cache(maxsize=8)
def _highpass_sos(fs: float, corner: float, order: int) -> np.ndarray:
    return sps.butter(order, corner, btype="highpass", fs=fs, output="sos").astype(np.float32)


@lru_cache(maxsize=8)
def _highpass_ba(fs: float, corner: float) -> tuple[np.ndarray, np.ndarray]:
    b, a = sps.butter(1, corner, btype="highpass", fs=fs)
    return b.astype(np.float32), a.astype(np.float32)


def highpass(x: np.ndarray, fs: float, corner: float, order: int = 1, axis: int = -1) -> np.ndarray:
    """Zero-phase (forward-backward) Butterworth high-pass; works on a whole batch at once. In float32, the
    store's type (twice as fast as float64; the two differ by < 1e-5 mV on PTB-XL records). A first-order filter
    (the default) runs in transfer-function form: one section, the same numbers as the second-order-section form
    and the same edge padding, ~25% faster."""
    x = np.asarray(x, dtype=np.float32)
    if order == 1:
        b, a = _highpass_ba(float(fs), corner)
        out = sps.filtfilt(b, a, x, axis=axis)
    else:
        out = sps.sosfiltfilt(_highpass_sos(float(fs), corner, order), x, axis=axis)
    return out.astype(np.float32, copy=False)


def _repair_nonfinite(x: np.ndarray, max_fraction: float, file: str) -> tuple[np.ndarray, int]:
    """Interpolate short NaN/inf gaps per lead; a lead with too many is a QualityError."""
    bad = ~np.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return x, 0
    fraction = bad.mean(axis=0)
    worst = int(np.argmax(fraction))
    if fraction[worst] > max_fraction:
        raise QualityError(
            "nonfinite_lead",
            f"lead {LEADS[worst]} is NaN/inf for {fraction[worst]:.0%} of samples (limit {max_fraction:.0%}); "
            "the recording is unusable, exclude it or fix the source file",
            file,
        )
    x = x.copy()
    t = np.arange(len(x))
    for lead in np.flatnonzero(bad.any(axis=0)):
        ok = ~bad[:, lead]
        x[bad[:, lead], lead] = np.interp(t[bad[:, lead]], t[ok], x[ok, lead])
    return x, n_bad


def prepare_record(raw: RawRecord, config: PreprocessConfig, file: str) -> tuple[np.ndarray, dict[str, float]]:
    """Raw record -> (12, n_samples) float32, lead-major as the store holds it, in LEADS order at config.fs, not yet
    high-passed.

    The high-pass runs afterwards on whole batches (`highpass`), which is much faster.
    """
    if raw.signal.ndim != 2 or raw.signal.shape[1] != len(raw.sig_names):
        raise RecordError(
            "bad_shape", f"signal shape {raw.signal.shape} does not match {len(raw.sig_names)} signals", file
        )
    if len(raw.sig_names) != len(LEADS):
        raise RecordError("lead_count", f"expected 12 leads, found {len(raw.sig_names)} ({list(raw.sig_names)})", file)
    try:
        order = _lead_order(tuple(raw.sig_names))
    except LeadError as exc:
        raise RecordError("lead_names", str(exc), file) from None
    units = {u.lower() for u in raw.units}
    scale = _UNIT_SCALE.get(next(iter(units))) if len(units) == 1 else None
    if scale is None:
        raise RecordError("units", f"signal units {sorted(units)} are not one of mV, uV, V", file)
    x = raw.signal if order is None else raw.signal[:, order]
    if scale != 1.0:
        x = x * np.float32(scale)
    if raw.fs != config.fs and not config.allow_resample:
        raise RecordError(
            "sampling_rate",
            f"recorded at {raw.fs:g} Hz but the model needs {config.fs} Hz and resampling is off; "
            "enable allow_resample or pick the matching file set",
            file,
        )
    x, n_repaired = _repair_nonfinite(x, config.max_nan_fraction, file)
    x = resample(x, raw.fs, config.fs)
    need = config.n_samples
    if len(x) < need:
        raise RecordError(
            "too_short",
            f"{len(x) / config.fs:.2f} s at {config.fs} Hz, the model needs {config.duration_s:g} s",
            file,
        )
    x = np.ascontiguousarray(x[:need].T, dtype=np.float32)  # (12, n): each lead's samples contiguous
    ptp = x.max(axis=1) - x.min(axis=1)
    flat = np.flatnonzero(ptp < config.flat_ptp_mv)
    if flat.size:
        names = [LEADS[i] for i in flat]
        raise QualityError(
            "flat_lead",
            f"lead(s) {names} are flat (peak-to-peak < {config.flat_ptp_mv} mV): electrode off or lead missing",
            file,
        )
    return x, {
        "fs_in": float(raw.fs),
        "n_samples_in": float(len(raw.signal)),
        "n_nonfinite_repaired": float(n_repaired),
    }


_UNIT_SCALE = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "v": 1e3}


@lru_cache(maxsize=256)
def _lead_order(sig_names: tuple[str, ...]) -> np.ndarray | None:
    """The permutation to LEADS order, None when the record is already in it (cached: a dataset has a few orders)."""
    order = lead_permutation(sig_names)
    return None if (order == np.arange(len(LEADS))).all() else order
