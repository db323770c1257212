"""A parametric 12-lead ECG: a cardiac dipole built from P/QRS/T waves, projected onto lead vectors.

Each wave is an asymmetric Gaussian in time carrying a 3-D dipole vector (x: left, y: inferior,
z: anterior). Limb leads are exact projections, so Einthoven's and Goldberger's laws hold
(III = II - I, aVR = -(I + II)/2, ...). Label effects change the waves, the ST plateau and the
rhythm the way the textbook describes them, so each planted label is learnable from the signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ecgproto.data.leads import LEADS

# Planted labels and their effect, one line each (see `_beat_waves` and `_rhythm`).
PLANTED_LABELS: dict[str, str] = {
    "NORM": "no planted abnormality",
    "SR": "sinus rhythm 58-98 bpm with respiratory variability",
    "AFIB": "irregular RR, no P waves, 4-8 Hz fibrillatory baseline",
    "STACH": "sinus rate 105-150 bpm",
    "SBRAD": "sinus rate 40-55 bpm",
    "1AVB": "PR interval 230-320 ms",
    "CLBBB": "QRS 130-170 ms, notched leftward-posterior R, no septal q, discordant T",
    "CRBBB": "QRS 120-150 ms, terminal rightward-anterior R' (rSR' in V1, wide S in I and V6)",
    "LVH": "QRS voltage x2-2.6 (Sokolow criteria met)",
    "IMI": "pathological Q in II, III, aVF",
    "STD_": "ST depression 0.1-0.2 mV in lateral and inferior leads",
    "STE_": "ST elevation 0.15-0.3 mV in V1-V4",
    "INVT": "inverted T waves",
    "LOWT": "T amplitude reduced to 10-25%",
    "PVC": "1-3 premature wide ectopic beats with compensatory pause",
}

_PRECORDIAL_DEG = np.array([115.0, 95.0, 75.0, 55.0, 30.0, 5.0])  # V1..V6 in the horizontal plane


def lead_matrix() -> np.ndarray:
    """(12, 3): the lead vector of each lead, in LEADS order."""
    s3 = np.sqrt(3) / 2
    limb = np.array(
        [
            [1.0, 0.0, 0.0],  # I
            [0.5, s3, 0.0],  # II
            [-0.5, s3, 0.0],  # III  = II - I
            [-0.75, -s3 / 2, 0.0],  # aVR = -(I + II) / 2
            [0.75, -s3 / 2, 0.0],  # aVL = I - II / 2
            [0.0, s3, 0.0],  # aVF = II - I / 2
        ]
    )
    a = np.deg2rad(_PRECORDIAL_DEG)
    chest = 1.4 * np.stack([np.cos(a), np.r_[0, 0, 0.1, 0.15, 0.15, 0.15], np.sin(a)], axis=1)
    matrix = np.vstack([limb, chest])
    assert len(matrix) == len(LEADS)
    return matrix


def _unit(v: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


@dataclass
class Wave:
    center: float  # s, relative to QRS onset
    sigma_left: float
    sigma_right: float
    vector: np.ndarray  # (3,) mV


@dataclass
class Person:
    """Per-record constants: axis, amplitudes, intervals, noise."""

    axis_deg: float
    r_amp: float
    t_amp: float
    p_amp: float
    pr: float
    qrs: float
    hr: float
    noise: float
    rng: np.random.Generator = field(repr=False)


def _person(rng: np.random.Generator, labels: set[str], noise: float, hr: float | None = None) -> Person:
    label_hr = (
        rng.uniform(105, 150)
        if "STACH" in labels
        else rng.uniform(40, 55)
        if "SBRAD" in labels
        else rng.uniform(75, 130)
        if "AFIB" in labels
        else rng.uniform(58, 98)
    )
    hr = label_hr if hr is None else hr  # `hr`: a rate the labels would not give (detection tests)
    return Person(
        axis_deg=rng.normal(50, 18),
        r_amp=rng.lognormal(np.log(1.2), 0.2),
        t_amp=rng.lognormal(np.log(0.32), 0.2),
        p_amp=rng.uniform(0.1, 0.18),
        pr=rng.uniform(0.23, 0.32) if "1AVB" in labels else rng.uniform(0.13, 0.19),
        qrs=(
            rng.uniform(0.13, 0.17)
            if "CLBBB" in labels
            else rng.uniform(0.12, 0.15)
            if "CRBBB" in labels
            else rng.uniform(0.075, 0.1)
        ),
        hr=hr,
        noise=noise * rng.lognormal(0, 0.4),
        rng=rng,
    )


def _beat_waves(
    p: Person, labels: set[str], rr: float, ectopic: bool = False
) -> tuple[list[Wave], np.ndarray, tuple[float, float]]:
    """Waves of one beat, its ST-plateau vector and the plateau's (start, end) in s from QRS onset."""
    q = p.qrs
    axis = np.deg2rad(p.axis_deg)
    r_dir = _unit((np.cos(axis), np.sin(axis), -0.45))
    qt = 0.40 * np.sqrt(rr) + (q - 0.09)
    waves: list[Wave] = []
    if ectopic:
        width = p.rng.uniform(0.14, 0.17)
        e_dir = _unit((-0.3, -0.8, 0.5))
        waves.append(Wave(0.5 * width, 0.25 * width, 0.25 * width, 1.6 * p.r_amp * e_dir))
        waves.append(Wave(width + 0.18, 0.07, 0.05, -0.5 * e_dir))
        return waves, np.zeros(3), (0.0, 0.0)
    if "AFIB" not in labels:
        p_dir = _unit((0.6, 0.75, 0.15))
        waves.append(Wave(-p.pr + 0.05, 0.022, 0.02, p.p_amp * p_dir))
    r_scale = p.rng.uniform(2.0, 2.6) if "LVH" in labels else 1.0
    if "CLBBB" in labels:
        l_dir = _unit((1.0, 0.25, -0.7))
        waves.append(Wave(0.35 * q, 0.14 * q, 0.12 * q, 1.1 * p.r_amp * r_scale * l_dir))
        waves.append(Wave(0.72 * q, 0.12 * q, 0.14 * q, 1.1 * p.r_amp * r_scale * l_dir))
        t_vec = -0.45 * l_dir
        st = -0.08 * l_dir
    else:
        normal_q = 0.085
        waves.append(Wave(0.15 * normal_q, 0.08 * normal_q, 0.08 * normal_q, 0.15 * _unit((-0.6, 0.2, 0.75))))
        waves.append(Wave(0.45 * normal_q, 0.13 * normal_q, 0.13 * normal_q, p.r_amp * r_scale * r_dir))
        waves.append(Wave(0.78 * normal_q, 0.1 * normal_q, 0.1 * normal_q, 0.45 * r_scale * _unit((-0.4, -0.5, -0.75))))
        if "CRBBB" in labels:
            waves.append(
                Wave(
                    normal_q + 0.35 * (q - normal_q) + 0.01,
                    0.3 * (q - normal_q) + 0.01,
                    0.35 * (q - normal_q) + 0.01,
                    0.8 * _unit((-0.75, 0.0, 0.65)),
                )
            )
        if "IMI" in labels:
            waves.append(Wave(0.02, 0.012, 0.012, 0.55 * _unit((0.0, -1.0, 0.0))))
        t_axis = axis - np.deg2rad(10)
        t_vec = p.t_amp * _unit((np.cos(t_axis), np.sin(t_axis), 0.35))
        if "CRBBB" in labels:
            t_vec = t_vec - 0.15 * _unit((-0.3, 0, 1.0))
        st = np.zeros(3)
    if "INVT" in labels:
        t_vec = -0.8 * t_vec
    elif "LOWT" in labels:
        t_vec = p.rng.uniform(0.1, 0.25) * t_vec
    if "STD_" in labels:
        st = st - p.rng.uniform(0.1, 0.2) * _unit((0.8, 0.55, 0.25))
    if "STE_" in labels:
        st = st + p.rng.uniform(0.15, 0.3) * _unit((-0.2, -0.05, 1.0))
    waves.append(Wave(qt - 0.09, 0.065, 0.045, t_vec))
    return waves, st, (q + 0.01, qt - 0.12)


def _rhythm(p: Person, labels: set[str], duration: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QRS onset times (s), their RR (s) and an ectopic flag per beat, covering [-1, duration + 1]."""
    rng = p.rng
    mean_rr = 60.0 / p.hr
    onsets, rrs = [], []
    t = -rng.uniform(0.3, 1.0) * mean_rr
    phase = rng.uniform(0, 2 * np.pi)
    while t < duration + 1.0:
        if "AFIB" in labels:
            rr = mean_rr * rng.uniform(0.55, 1.45)
        else:
            rr = mean_rr * (1 + 0.04 * np.sin(2 * np.pi * t / 4.0 + phase) + 0.01 * rng.standard_normal())
        onsets.append(t)
        rrs.append(rr)
        t += rr
    onsets_a, rrs_a = np.array(onsets), np.array(rrs)
    ectopic = np.zeros(len(onsets_a), dtype=bool)
    if "PVC" in labels:
        inside = np.flatnonzero((onsets_a > 0.8) & (onsets_a < duration - 1.5))
        chosen = rng.choice(inside[1:-1:2], size=min(len(inside[1:-1:2]), int(rng.integers(1, 4))), replace=False)
        for i in chosen:  # premature beat at 60% of the RR, compensatory pause keeps the sinus clock
            onsets_a[i] = onsets_a[i - 1] + 0.6 * rrs_a[i - 1]
            ectopic[i] = True
    return onsets_a, rrs_a, ectopic


def _gauss(t: np.ndarray, w: Wave) -> np.ndarray:
    d = t - w.center
    sigma = np.where(d < 0, w.sigma_left, w.sigma_right)
    return np.exp(-0.5 * (d / sigma) ** 2)


def _plateau(t: np.ndarray, start: float, end: float, edge: float = 0.015) -> np.ndarray:
    return 1 / (1 + np.exp(-(t - start) / edge)) * 1 / (1 + np.exp((t - end) / edge))


def _sinusoid(t: np.ndarray, hz: float, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """amp * sin(2 pi hz t + phase) per lead, from one sin and one cos of t: (n,) x (12,) -> (n, 12)."""
    a = 2 * np.pi * hz * t
    return np.outer(np.sin(a), amp * np.cos(phase)) + np.outer(np.cos(a), amp * np.sin(phase))


def _noise(p: Person, n: int, fs: float, mains_hz: float) -> np.ndarray:
    """Baseline wander, mains hum and muscle noise, (n, 12) mV."""
    rng = p.rng
    t = np.arange(n) / fs
    k = len(LEADS)
    out = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.008 * p.noise)
    for _ in range(2):
        out += _sinusoid(t, rng.uniform(0.05, 0.4), rng.uniform(0.03, 0.12, k) * p.noise, rng.uniform(0, 2 * np.pi, k))
    hum = rng.uniform(0.003, 0.015) * p.noise
    if fs > 2.5 * mains_hz:  # below that the recorder's anti-alias filter has removed it
        out += _sinusoid(t, mains_hz, np.full(k, hum), rng.uniform(0, 2 * np.pi, k))
    return out


def synthesize(
    rng: np.random.Generator,
    labels: set[str],
    *,
    fs: float = 500.0,
    duration: float = 10.0,
    noise: float = 1.0,
    mains_hz: float = 50.0,
    hr: float | None = None,
) -> tuple[np.ndarray, dict[str, float | np.ndarray]]:
    """One 12-lead record (n, 12) in mV, LEADS order, and facts about it (rate, PR, QRS, the QRS onsets in s).
    `hr` overrides the rate the labels give."""
    p = _person(rng, labels, noise, hr)
    n = int(round(fs * duration))
    t = np.arange(n) / fs
    dipole = np.zeros((n, 3))
    onsets, rrs, ectopic = _rhythm(p, labels, duration)
    for onset, rr, is_ectopic in zip(onsets, rrs, ectopic, strict=True):
        waves, st, (st0, st1) = _beat_waves(p, labels, rr, bool(is_ectopic))
        for w in waves:  # each wave only where it is not negligible (+-5 sigma)
            lo, hi = np.searchsorted(t, [onset + w.center - 5 * w.sigma_left, onset + w.center + 5 * w.sigma_right])
            if lo < hi:
                dipole[lo:hi] += _gauss(t[lo:hi] - onset, w)[:, None] * w.vector
        if np.any(st):
            lo, hi = np.searchsorted(t, [onset + st0 - 0.1, onset + st1 + 0.1])
            dipole[lo:hi] += _plateau(t[lo:hi] - onset, st0, st1)[:, None] * st
    if "AFIB" in labels:
        f_dir = _unit((-0.3, 0.6, 0.7))
        fib = sum(
            rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * rng.uniform(4, 8) * t + rng.uniform(0, 2 * np.pi))
            for _ in range(3)
        )
        dipole += fib[:, None] * f_dir
    signal = dipole @ lead_matrix().T + _noise(p, n, fs, mains_hz)
    facts = {
        "hr": p.hr,
        "pr_s": p.pr,
        "qrs_s": p.qrs,
        "n_beats": float(np.sum((onsets >= 0) & (onsets < duration))),
        "n_ectopic": float(ectopic.sum()),
        "axis_deg": p.axis_deg,
        "qrs_onsets_s": onsets[(onsets >= 0) & (onsets < duration)],
    }
    return signal.astype(np.float32), facts
