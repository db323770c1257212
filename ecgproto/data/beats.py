"""Beat positions of a 12-lead record, with a beat-scale grid when detection fails.

Both detectors run on the sum over the leads of the absolute first difference (a QRS is where every
lead changes fastest, whichever its axis).

  peaks  (default) a whole batch of records at once: that energy smoothed over 70 ms (scipy.ndimage),
         its local maxima at least a refractory period apart (scipy.signal.find_peaks) that reach
         30% of the largest peak within 1 s either side, and `min_peak_ratio` times the record's
         median. On the full PTB-XL it finds 99% of XQRS's beats within 50 ms, with under 1% extra,
         where the model takes its beat windows (docs/benchmarks.md), ~20x faster.
  xqrs   wfdb's XQRS, one record at a time, each detection moved to the peak of the energy smoothed
         over 50 ms (`wfdb.processing.correct_peaks`): the reference the default is tested against.

Detection is refused, and beat-scale windows are laid on a regular grid instead (flagged `grid`),
when it finds fewer than two beats, a median RR outside the plausible range, or peaks no higher
than the record's background (noise, artefact, a flat record).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import wfdb.processing as wp
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import maximum_filter1d, uniform_filter1d
from scipy.signal import find_peaks

BeatSource = Literal["detected", "grid"]


class BeatConfig(BaseModel):
    """How beats are found; part of a store's cache key."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    min_rr_s: float = Field(0.24, gt=0, description="median RR below this (> 250 bpm) is not believed")
    max_rr_s: float = Field(3.0, gt=0, description="median RR above this (< 20 bpm) is not believed")
    min_peak_ratio: float = Field(
        3.0,
        gt=0,
        description="median height of the detected peaks over the median of the detector's input: "
        "a QRS stands out of its record; noise does not",
    )
    refractory_s: float = Field(
        0.22,
        gt=0,
        description="XQRS refractory period (no second QRS within it); with "
        "its T-wave check on, beats of rates over ~130 bpm were taken for T waves",
    )
    grid_spacing_s: float = Field(1.0, gt=0, description="fallback: one beat-scale window per this many seconds")
    max_beats: int = Field(40, ge=1, description="beats kept per record (10 s at 240 bpm)")
    detector: Literal["peaks", "xqrs"] = Field(
        "peaks",
        description="peaks: smoothed-energy local maxima over a batch of records (scipy; fast); xqrs: wfdb's XQRS "
        "one record at a time (the reference)",
    )
    smooth_s: float = Field(0.07, gt=0, description="peaks: the energy is averaged over this window")
    relative_height: float = Field(
        0.3, gt=0, le=1, description="peaks: a beat reaches this share of the largest peak within `neighbourhood_s`"
    )
    neighbourhood_s: float = Field(2.0, gt=0, description="peaks: the window (centred) of that largest peak")


@dataclass(frozen=True)
class Beats:
    positions: np.ndarray  # (k,) int sample index of each beat's fiducial point, ascending
    source: BeatSource

    def padded(self, width: int) -> np.ndarray:
        """(width,) int16 positions, -1 where there is no beat."""
        out = np.full(width, -1, dtype=np.int16)
        out[: min(width, len(self.positions))] = self.positions[:width]
        return out


def qrs_energy(signal: np.ndarray) -> np.ndarray:
    """(12, n) -> (n,) sum over leads of |first difference|."""
    x = np.asarray(signal, dtype=np.float64)
    return np.abs(np.diff(x, axis=-1, prepend=x[..., :1])).sum(axis=0)


def grid_beats(n_samples: int, fs: float, config: BeatConfig) -> np.ndarray:
    """Fallback positions: one every `grid_spacing_s`, the first half a spacing in."""
    step = max(int(round(config.grid_spacing_s * fs)), 1)
    return np.arange(step // 2, n_samples, step, dtype=np.int64)


def detect_beats(signal: np.ndarray, fs: float, config: BeatConfig | None = None) -> Beats:
    """(12, n) preprocessed signal in mV at `fs` -> its beats, detected or (when detection fails) a grid."""
    config = config or BeatConfig()
    if config.detector == "peaks":
        padded, sources = _peak_beats(np.asarray(signal)[None], fs, config)
        return Beats(padded[0][padded[0] >= 0].astype(np.int64), sources[0])
    return _xqrs_beats(signal, fs, config)


def _peak_beats(signals: np.ndarray, fs: float, config: BeatConfig) -> tuple[np.ndarray, list[BeatSource]]:
    """The `peaks` detector over a batch (B, 12, n) -> (B, max_beats) int16 positions padded with -1 and each
    record's source. The filters, the fiducial-point search and the plausibility check run on the whole batch at
    once; only scipy's find_peaks runs per record."""
    x = np.asarray(signals, dtype=np.float32)
    n_rec, n = len(x), x.shape[-1]
    energy = np.zeros((n_rec, n), dtype=np.float32)  # sum over leads of |first difference|, 0 at the first sample
    np.abs(np.diff(x, axis=-1), out=(step := np.empty(x.shape[:-1] + (n - 1,), dtype=np.float32)))
    step.sum(axis=1, out=energy[:, 1:])
    smooth = uniform_filter1d(energy, size=max(int(round(config.smooth_s * fs)), 1), axis=1, mode="nearest")
    local = maximum_filter1d(smooth, size=max(int(round(config.neighbourhood_s * fs)), 1), axis=1, mode="nearest")
    floor = config.min_peak_ratio * np.median(smooth, axis=1, keepdims=True)
    threshold = np.maximum(config.relative_height * local, floor)
    distance = max(int(round(config.refractory_s * fs)), 1)
    # the fiducial point, as XQRS's correct_peaks sets it: the top of the energy minus its 50 ms mean, within 80 ms
    sharp = energy - uniform_filter1d(energy, size=max(int(round(0.05 * fs)), 1), axis=1, mode="nearest")
    radius = np.arange(-int(round(0.12 * fs)), int(round(0.08 * fs)) + 1)  # the smoothed peak lags a wide QRS
    usable = np.isfinite(smooth).all(axis=1) & (smooth.max(axis=1) > 0)
    found = [find_peaks(smooth[b], distance=distance)[0] if usable[b] else np.zeros(0, np.int64) for b in range(n_rec)]
    rec = np.repeat(np.arange(n_rec), [len(f) for f in found])
    pos = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
    tall = smooth[rec, pos] >= threshold[rec, pos]
    rec, pos = rec[tall], pos[tall]
    around = np.clip(pos[:, None] + radius, 0, n - 1)
    top = sharp[rec[:, None], around]  # (k, window)
    # a wide, notched QRS has several humps: its first one that reaches 60% of the highest (its onset side, where
    # XQRS puts it), at that hump's own top
    first = (top >= 0.6 * top.max(axis=1, initial=-np.inf, keepdims=True)).argmax(axis=1)
    ahead = np.clip(first[:, None] + np.arange(4), 0, top.shape[1] - 1)
    at = ahead[np.arange(len(pos)), np.take_along_axis(top, ahead, axis=1).argmax(axis=1)]
    peak = around[np.arange(len(pos)), at]
    # each record's distinct positions, ascending
    order = np.lexsort((peak, rec))
    rec, peak = rec[order], peak[order]
    distinct = np.ones(len(peak), dtype=bool)
    distinct[1:] = (rec[1:] != rec[:-1]) | (peak[1:] != peak[:-1])
    rec, peak = rec[distinct], peak[distinct]
    plausible = _plausible_batch(rec, peak, energy, fs, config)
    out = np.full((n_rec, config.max_beats), -1, dtype=np.int16)
    rank = np.arange(len(peak)) - np.searchsorted(rec, rec)  # index of each beat within its record
    keep = plausible[rec] & (rank < config.max_beats)
    out[rec[keep], rank[keep]] = peak[keep]
    grid = grid_beats(n, fs, config)[: config.max_beats]
    out[np.ix_(~plausible, np.arange(len(grid)))] = grid
    return out, ["detected" if p else "grid" for p in plausible]


def _group_median(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """np.median of `values` within each group 0..n_groups-1 (`groups` ascending); NaN for an empty group."""
    order = np.lexsort((values, groups))
    v = values[order].astype(np.float64)
    start = np.searchsorted(groups[order], np.arange(n_groups))
    count = np.bincount(groups, minlength=n_groups)
    out = np.full(n_groups, np.nan)
    has = count > 0
    lo, hi = start[has] + (count[has] - 1) // 2, start[has] + count[has] // 2
    out[has] = (v[lo] + v[hi]) / 2
    return out


def _plausible_batch(
    rec: np.ndarray, peak: np.ndarray, energy: np.ndarray, fs: float, config: BeatConfig
) -> np.ndarray:
    """`_plausible` for every record of a batch at once: `rec`, `peak` each record's peaks, ascending."""
    n_rec = len(energy)
    count = np.bincount(rec, minlength=n_rec)
    same = rec[1:] == rec[:-1]
    rr = _group_median(((peak[1:] - peak[:-1]) / fs)[same], rec[1:][same], n_rec)
    height = _group_median(energy[rec, peak], rec, n_rec)
    background = np.median(energy, axis=1)
    with np.errstate(invalid="ignore"):
        return (
            (count >= 2)
            & (rr >= config.min_rr_s)
            & (rr <= config.max_rr_s)
            & (background > 0)
            & (height >= config.min_peak_ratio * background)
        )


def _xqrs_beats(signal: np.ndarray, fs: float, config: BeatConfig) -> Beats:
    n = signal.shape[-1]
    energy = qrs_energy(signal)
    peaks = np.zeros(0, dtype=np.int64)
    if np.isfinite(energy).all() and energy.max() > 0:
        conf = wp.XQRS.Conf(ref_period=config.refractory_s, hr_max=60.0 / config.min_rr_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # XQRS warns on records it cannot learn from; the checks below decide
            try:
                xqrs = wp.XQRS(sig=energy, fs=fs, conf=conf)
                xqrs.detect(verbose=False)
                peaks = np.asarray(xqrs.qrs_inds, dtype=np.int64)
            except (ValueError, IndexError, ZeroDivisionError):  # too short or degenerate for its learning phase
                peaks = np.zeros(0, dtype=np.int64)
        if len(peaks):
            peaks = np.unique(
                np.asarray(
                    wp.correct_peaks(
                        energy,
                        peaks,
                        search_radius=int(round(0.08 * fs)),
                        smooth_window_size=max(int(round(0.05 * fs)), 1),
                        peak_dir="up",
                    ),
                    dtype=np.int64,
                )
            )
            peaks = peaks[(peaks >= 0) & (peaks < n)]
    if _plausible(peaks, energy, fs, config):
        return Beats(peaks[: config.max_beats], "detected")
    return Beats(grid_beats(n, fs, config)[: config.max_beats], "grid")


def _plausible(
    peaks: np.ndarray, energy: np.ndarray, fs: float, config: BeatConfig, background: float | None = None
) -> bool:
    """Enough beats at a heart rate people have, each standing out of the record's median energy (`background`,
    computed here unless the caller has it)."""
    if len(peaks) < 2:
        return False
    rr = float(np.median(np.diff(peaks))) / fs
    if not config.min_rr_s <= rr <= config.max_rr_s:
        return False
    background = float(np.median(energy)) if background is None else background
    return background > 0 and float(np.median(energy[peaks])) >= config.min_peak_ratio * background


def detect_batch(signals: np.ndarray, fs: float, config: BeatConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """(B, 12, n) -> (B, max_beats) int16 positions padded with -1, and each record's source."""
    config = config or BeatConfig()
    if config.detector == "peaks" and len(signals):
        padded, sources = _peak_beats(signals, fs, config)
        return padded, list(sources)
    found = [_xqrs_beats(x, fs, config) for x in signals]
    return np.stack([b.padded(config.max_beats) for b in found]) if found else np.zeros(
        (0, config.max_beats), dtype=np.int16
    ), [b.source for b in found]
