"""Figures a reviewer looks at: ECGs in the 12-lead paper layout, label prevalence bars.

Matplotlib with the Agg backend only; every function returns a Figure (outside pyplot's registry, so
many of them can be built and saved) and never shows it.
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ecgproto.data.leads import LEADS  # noqa: E402

# Standard paper layout: 3 rows x 4 columns of 2.5 s, then a 10 s lead-II rhythm strip.
PAPER_GRID = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
ROW_MV = 3.0  # vertical space per row (30 mm at 10 mm/mV)


def plot_ecg(
    signal: np.ndarray,
    fs: float,
    title: str = "",
    highlight: tuple[float, float] | None = None,
    highlight_leads: tuple[str, ...] | None = None,
    beat: bool = False,
    inches_per_s: float = 0.8,
) -> Figure:
    """(12, n) mV in LEADS order -> paper-style figure at 25 mm/s, 10 mm/mV.

    The figure is `inches_per_s` wide per second of signal: 0.8 puts a 10 s ECG (and the enlarged beat) in ~11 in,
    1,100 px at the 100 dpi figures are saved with, so the lead names stay legible at the width MLflow's artifact
    panel shows an image.

    `highlight` (start_s, end_s) shades a window, on `highlight_leads` only if given; with `beat` the window is
    also drawn alone, enlarged, in those leads (a beat-scale prototype: the beat itself, not just its place).
    """
    duration = signal.shape[1] / fs
    scale = inches_per_s / 1.25
    height = ((len(PAPER_GRID) + 1) * ROW_MV * 0.5) * scale + 0.8
    zoom = beat and highlight is not None and bool(highlight_leads)
    ecg_width, beat_width = duration * inches_per_s, 4.0 * scale
    fig = Figure(figsize=(ecg_width + (beat_width if zoom else 0), height))  # not kept by pyplot
    axes = fig.subplots(1, 2, width_ratios=[ecg_width, beat_width]) if zoom else [fig.subplots()]
    draw_ecg(axes[0], signal, fs, title, highlight, highlight_leads, wrap=int(14 * (ecg_width + beat_width * zoom)))
    if zoom:
        assert highlight is not None and highlight_leads is not None
        draw_beats(axes[1], [("beat", signal, highlight)], highlight_leads, fs)
    fig.tight_layout()
    return fig


def draw_ecg(
    ax: plt.Axes,
    signal: np.ndarray,
    fs: float,
    title: str = "",
    highlight: tuple[float, float] | None = None,
    highlight_leads: tuple[str, ...] | None = None,
    wrap: int = 110,
    strips: tuple[str, ...] | None = None,
    fontsize: float = 9,
) -> None:
    """Draw the paper layout (3 x 4 leads of 2.5 s, then 10 s rhythm strips: `strips`, by default lead II, or the
    highlighted window's middle lead when the window is not on lead II) on `ax`; a title longer than `wrap`
    characters wraps. A window in a 2.5 s column shows only where that column's time covers it: `strips` of the
    window's leads show it in each of them."""
    if signal.shape[0] != len(LEADS):
        raise ValueError(f"expected (12, n) in {LEADS} order, got {signal.shape}")
    n = signal.shape[1]
    duration = n / fs
    seg = duration / 4
    if not strips:
        middle = highlight_leads[len(highlight_leads) // 2] if highlight_leads else "II"
        strips = ("II" if not highlight_leads or "II" in highlight_leads else middle,)
    rows = len(PAPER_GRID) + len(strips)
    _paper(ax, duration, rows * ROW_MV)
    t = np.arange(n) / fs
    for r, row in enumerate(PAPER_GRID):
        y0 = (rows - r - 0.5) * ROW_MV
        for c, lead in enumerate(row):
            sl = slice(int(c * seg * fs), int((c + 1) * seg * fs))
            ax.plot(t[sl], signal[LEADS.index(lead), sl] + y0, color="black", lw=0.6)
            ax.text(c * seg + 0.05, y0 + 0.9, lead, fontsize=fontsize, weight="bold")
            if highlight and (highlight_leads is None or lead in highlight_leads):
                lo, hi = max(highlight[0], c * seg), min(highlight[1], (c + 1) * seg)
                if lo < hi:
                    ax.axvspan(
                        lo,
                        hi,
                        ymin=(y0 - ROW_MV / 2) / (rows * ROW_MV),
                        ymax=(y0 + ROW_MV / 2) / (rows * ROW_MV),
                        color="tab:orange",
                        alpha=0.25,
                        lw=0,
                    )
    # The 10 s strips: lead II, unless the window is on other leads: then the middle one of them, so a
    # window the 2.5 s columns do not show (e.g. V5 at 2-4 s) is still visible on its own lead.
    for i, strip in enumerate(strips):
        y0 = (len(strips) - i - 0.5) * ROW_MV
        ax.plot(t, signal[LEADS.index(strip)] + y0, color="black", lw=0.6)
        ax.text(0.05, y0 + 0.9, strip, fontsize=fontsize, weight="bold")
        if highlight and (highlight_leads is None or strip in highlight_leads):
            lo, hi = (len(strips) - i - 1) / rows, (len(strips) - i) / rows
            ax.axvspan(*highlight, ymin=lo, ymax=hi, color="tab:orange", alpha=0.25, lw=0)
    ax.set_title(
        textwrap.fill(title, wrap), fontsize=fontsize, loc="left"
    )  # a long title wraps, never runs into the next panel


def draw_beats(
    ax: plt.Axes,
    beats: list[tuple[str, np.ndarray, tuple[float, float]]],
    leads: tuple[str, ...],
    fs: float,
    rows: int = 6,
) -> None:
    """Beat windows side by side on ECG paper, one row per lead: `beats` = (caption, (12, n) mV signal,
    (start_s, end_s)), e.g. an input's best-matching beat beside the prototype's source beat in the same leads. More
    than `rows` leads (a whole 12-lead beat) take several columns of `rows` leads, each beat's columns together."""
    width = max(end - start for _, _, (start, end) in beats)
    gap = 0.12
    columns = [leads[i : i + rows] for i in range(0, len(leads), rows)]
    n_rows = max(len(c) for c in columns)
    panels = [(b, c) for b in range(len(beats)) for c in range(len(columns))]
    total = len(panels) * width + (len(panels) - 1) * gap + gap * (len(beats) - 1)
    _paper(ax, total, n_rows * ROW_MV)
    ax.set_title(
        textwrap.fill("  |  ".join(f"{caption} {start:.2f}-{end:.2f} s" for caption, _, (start, end) in beats), 40),
        fontsize=9,
        loc="left",
    )
    for i, (b, c) in enumerate(panels):
        caption, signal, (start, end) = beats[b]
        x0 = i * (width + gap) + b * gap  # a wider gap between the beats than between one beat's columns
        lo, hi = int(round(start * fs)), int(round(end * fs))
        t = x0 + np.arange(hi - lo) / fs
        for r, lead in enumerate(columns[c]):
            y0 = (n_rows - r - 0.5) * ROW_MV
            ax.plot(t, signal[LEADS.index(lead), lo:hi] + y0, color="black", lw=0.8)
            ax.text(x0 + 0.02, y0 + 0.9, lead, fontsize=9, weight="bold")


def _paper(ax: plt.Axes, duration: float, height_mv: float) -> None:
    """ECG paper: 1 mm (0.04 s, 0.1 mV) and 5 mm grid, drawn as two line collections (ticks are slow)."""
    ax.set_xlim(0, duration)
    ax.set_ylim(0, height_mv)
    for step, color, lw in ((0.04, "#f6d5d5", 0.3), (0.2, "#e8a0a0", 0.6)):
        xs = np.arange(0, duration + 1e-9, step)
        ys = np.arange(0, height_mv + 1e-9, step * 2.5)
        ax.add_collection(
            LineCollection(
                [((x, 0), (x, height_mv)) for x in xs] + [((0, y), (duration, y)) for y in ys],
                colors=color,
                linewidths=lw,
                zorder=0,
            )
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect(0.4 / 1.0)  # 0.2 s and 0.5 mV are both 5 mm
    ax.set_xlabel("25 mm/s, 10 mm/mV", fontsize=7, loc="right")  # a large square: 0.2 s x 0.5 mV


def plot_label_prevalence(table: pd.DataFrame) -> Figure:
    """Bars of positives per label (columns code, n_<split> per split, n_total), labels with >0 only."""
    cols = [c for c in table.columns if c.startswith("n_") and c != "n_total"]
    t = table[table[cols].sum(axis=1) > 0].sort_values("n_total", ascending=True)
    fig = Figure(figsize=(7, 0.22 * len(t) + 1.2))
    ax = fig.subplots()
    left = np.zeros(len(t))
    for col, color in zip(cols, ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=False):
        ax.barh(t["code"], t[col], left=left, color=color, label=col[2:])
        left += t[col].to_numpy()
    ax.set_xlabel("records")
    ax.legend(loc="lower right")
    ax.set_title("Label prevalence by split")
    fig.tight_layout()
    return fig
