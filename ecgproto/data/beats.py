"""Beat positions of a 12-lead record: wfdb's XQRS detector, with a beat-scale grid when it fails.

The detector runs on the sum over the leads of the absolute first difference (a QRS is where every
lead changes fastest, whichever its axis), and each detection is moved to the peak of that signal
smoothed over 50 ms (`wfdb.processing.correct_peaks`), so the beats of a record share one fiducial
point. Detection is refused, and beat-scale windows are laid on a regular grid instead (flagged
`grid`), when it finds fewer than two beats, a median RR outside the plausible range, or peaks no
higher than the record's background (noise, artefact, a flat record).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import wfdb.processing as wp
from pydantic import BaseModel, Field

BeatSource = Literal["detected", "grid"]


class BeatConfig(BaseModel):
    """How beats are found; part of a store's cache key."""

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


def _plausible(peaks: np.ndarray, energy: np.ndarray, fs: float, config: BeatConfig) -> bool:
    if len(peaks) < 2:
        return False
    rr = float(np.median(np.diff(peaks))) / fs
    if not config.min_rr_s <= rr <= config.max_rr_s:
        return False
    background = float(np.median(energy))
    return background > 0 and float(np.median(energy[peaks])) >= config.min_peak_ratio * background


def detect_batch(signals: np.ndarray, fs: float, config: BeatConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """(B, 12, n) -> (B, max_beats) int16 positions padded with -1, and each record's source."""
    config = config or BeatConfig()
    found = [detect_beats(x, fs, config) for x in signals]
    return np.stack([b.padded(config.max_beats) for b in found]) if found else np.zeros(
        (0, config.max_beats), dtype=np.int16
    ), [b.source for b in found]
