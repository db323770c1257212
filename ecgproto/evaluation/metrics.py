"""Whole-fold metrics: macro-AUROC over every record of a fold at once (never averaged over
batches), per-label AUROC and AUPRC with bootstrap 95% CIs, macro-AUPRC, and paired differences.

One bootstrap serves every CI (`resampled`): records are resampled with a seeded generator, so the
same seed draws the same resamples for any scores, and two models' figures are paired. AUROC is the
Mann-Whitney statistic computed from ranks for all labels in one pass, which makes a 1,000-resample
bootstrap over 71 labels take seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score


def auroc_per_label(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N, L) targets and scores -> (L,) AUROC; NaN where a label has no positives or no negatives."""
    y = np.asarray(y, dtype=bool)
    ranks = rankdata(np.asarray(score, dtype=np.float64), axis=0)  # ties get mid-ranks
    n_pos = y.sum(axis=0)
    n_neg = y.shape[0] - n_pos
    u = (ranks * y).sum(axis=0) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def macro_auroc(y: np.ndarray, score: np.ndarray) -> float:
    auc = auroc_per_label(y, score)
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")


def auprc_per_label(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N, L) -> (L,) average precision; NaN where a label has no positives or no negatives."""
    y = np.asarray(y, dtype=bool)
    out = np.full(y.shape[1], np.nan)
    for j in np.flatnonzero(y.any(axis=0) & ~y.all(axis=0)):
        out[j] = average_precision_score(y[:, j], score[:, j])
    return out


def macro_auprc(y: np.ndarray, score: np.ndarray) -> float:
    y = np.asarray(y, dtype=bool)
    keep = y.any(axis=0)
    if not keep.any():
        return float("nan")
    return float(np.mean([average_precision_score(y[:, j], score[:, j]) for j in np.flatnonzero(keep)]))


def resampled(
    y: np.ndarray,
    score: np.ndarray,
    n_boot: int,
    seed: int,
    per_label: Callable[[np.ndarray, np.ndarray], np.ndarray] = auroc_per_label,
) -> np.ndarray:
    """(n_boot, L) a per-label statistic (AUROC by default) on bootstrap resamples of the records, NaN where a
    resample lacks a label's positives or negatives; a seed draws the same resamples whatever the scores, so two
    models' rows are paired. The one bootstrap of the project."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    n = y.shape[0]
    per = np.empty((n_boot, y.shape[1]))
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        per[b] = per_label(y[idx], score[idx])
    return per


def percentile_ci(per: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile 95% interval of bootstrap figures along `axis`, ignoring NaN (resamples a label was absent from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(per, [2.5, 97.5], axis=axis)
    return lo, hi


def macro_ci(per: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of a macro figure from per-label resamples (n_boot, L): each resample's mean over
    the labels it scored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = np.nanmean(per, axis=1)
    lo, hi = percentile_ci(macro)
    return float(lo), float(hi)


def bootstrap_auroc(
    y: np.ndarray,
    score: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Percentile 95% CIs: per-label (lo, hi) and macro (lo, hi), resampling records."""
    per = resampled(y, score, n_boot, seed)
    lo, hi = percentile_ci(per)
    mlo, mhi = macro_ci(per)
    return lo, hi, np.array([mlo]), np.array([mhi])


def paired_bootstrap_difference(
    y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Macro-AUROC of `score_a` minus that of `score_b` on the same records, with a percentile 95% CI from
    resampling records once for both (paired): what two models' own CIs cannot say, since their errors on a
    fold are correlated. Both macros average the labels scored in each resample, the same for both."""
    diff = macro_auroc(y, score_a) - macro_auroc(y, score_b)
    if not n_boot:
        return diff, float("nan"), float("nan")
    lo, hi = macro_ci(resampled(y, score_a, n_boot, seed) - resampled(y, score_b, n_boot, seed))
    return diff, lo, hi


def difference_text(metrics: Mapping[str, float], key: str = "fused_minus_baseline.macro_auroc") -> str:
    """'+0.0039 [-0.0289, +0.0309]': a logged difference and its CI, as the flows and benchmarks print it."""
    return f"{metrics[key]:+.4f} [{metrics[f'{key}_lo']:+.4f}, {metrics[f'{key}_hi']:+.4f}]"


def evaluation_table(
    y: np.ndarray, score: np.ndarray, codes: tuple[str, ...], n_boot: int = 1000, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-label table (code, n_pos, auroc, ci) and the headline metrics with the macro CI."""
    auc = auroc_per_label(y, score)
    lo, hi, mlo, mhi = (
        bootstrap_auroc(y, score, n_boot, seed) if n_boot else (auc * np.nan,) * 2 + (np.array([np.nan]),) * 2
    )
    table = pd.DataFrame(
        {"code": codes, "n_pos": np.asarray(y).sum(axis=0).astype(int), "auroc": auc, "auroc_lo": lo, "auroc_hi": hi}
    )
    headline = {
        "macro_auroc": macro_auroc(y, score),
        "macro_auroc_lo": float(mlo[0]),
        "macro_auroc_hi": float(mhi[0]),
        "macro_auprc": macro_auprc(y, score),
        "n_labels_scored": float(np.isfinite(auc).sum()),
    }
    return table, headline
