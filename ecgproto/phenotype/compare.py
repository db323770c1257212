"""How the feature sets compare: strength and specificity per phecode category, phecode prediction
from prototype activations, and whether classes with mixed-significance prototypes are more spread out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ecgproto.evaluation.metrics import auroc_per_label

TARGETS = {"427.21": "atrial fibrillation", "428": "heart failure", "994.2": "sepsis", "585": "renal failure"}


def strength_by_category(results: pd.DataFrame, reference: str = "prototype") -> pd.DataFrame:
    """Per feature set and category: phecodes tested, significant (own Bonferroni and the shared one),
    median best -log10 p, and a paired Wilcoxon of each set's best -log10 p per phecode vs `reference`."""
    best = (
        results.groupby(["feature_set", "phecode"], observed=True)
        .agg(
            best=("neg_log_p", "max"),
            category=("phecode_category", "first"),
            sig=("significant_bonf", "any"),
            sig_shared=("significant_bonf_shared", "any"),
        )
        .reset_index()
    )
    wide = best.pivot(index="phecode", columns="feature_set", values="best")
    rows = []
    for (fs, cat), g in best.groupby(["feature_set", "category"], observed=True):
        row = {
            "feature_set": fs,
            "phecode_category": cat,
            "phecodes": len(g),
            "significant_phecodes": int(g["sig"].sum()),
            "significant_phecodes_shared": int(g["sig_shared"].sum()),
            "median_best_neg_log_p": float(g["best"].median()),
            "wilcoxon_p_vs_reference": np.nan,
        }
        if fs != reference and reference in wide.columns:
            pair = wide.loc[g["phecode"], [fs, reference]].dropna()
            if len(pair) >= 5 and (pair[fs] != pair[reference]).any():
                row["wilcoxon_p_vs_reference"] = float(stats.wilcoxon(pair[fs], pair[reference]).pvalue)
        rows.append(row)
    return pd.DataFrame(rows)


def specificity(results: pd.DataFrame) -> pd.DataFrame:
    """Per significant feature: how many phecodes and categories it hits (fewer = more specific)."""
    sig = results[results["significant_bonf"]]
    per = (
        sig.groupby(["feature_set", "feature_id"], observed=True)
        .agg(phecodes=("phecode", "nunique"), categories=("phecode_category", "nunique"))
        .reset_index()
    )
    return (
        per.groupby("feature_set", observed=True)
        .agg(
            significant_features=("feature_id", "size"),
            median_phecodes_per_feature=("phecodes", "median"),
            median_categories_per_feature=("categories", "median"),
        )
        .reset_index()
    )


def feature_count_calibration(
    results: pd.DataFrame, features: dict[str, int], reference: str = "prototype", n_perm: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Is a set's advantage in best -log10 p just its number of features? For each other set, draw
    random subsets of the reference set of that set's size and compare the median best -log10 p."""
    rng = np.random.default_rng(seed)
    ref = results[results["feature_set"] == reference]
    ids = ref["feature_id"].unique()
    piv = ref.pivot_table(index="feature_id", columns="phecode", values="neg_log_p", observed=True)
    rows = []
    for fs, m in features.items():
        if fs == reference or m >= len(ids):
            continue
        observed = results[results["feature_set"] == fs].groupby("phecode", observed=True)["neg_log_p"].max().median()
        draws = [np.median(piv.loc[rng.choice(ids, m, replace=False)].max(axis=0)) for _ in range(n_perm)]
        rows.append(
            {
                "feature_set": fs,
                "n_features": m,
                "median_best_neg_log_p": float(observed),
                f"{reference}_subset_median": float(np.median(draws)),
                "share_of_subsets_better": float(np.mean(np.asarray(draws) > observed)),
            }
        )
    return pd.DataFrame(rows)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one target: the training metrics' rank (Mann-Whitney) AUROC, NaN without both classes."""
    return float(auroc_per_label(np.asarray(y)[:, None], np.asarray(score)[:, None])[0])


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds that keep each subject's admissions together."""
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))


def predict_phecode(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    n_boot: int = 500,
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None,
    C: float = 0.1,
) -> tuple[float, float, float, np.ndarray]:
    """Out-of-fold probabilities of an L2 logistic regression, folds grouped by subject.
    Returns AUC, its bootstrap 95% CI (resampling subjects) and the out-of-fold scores."""
    oof = np.zeros(len(y))
    for train, test in folds or grouped_folds(y, groups, seed=seed):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        model.fit(x[train], y[train])
        oof[test] = model.predict_proba(x[test])[:, 1]
    rng = np.random.default_rng(seed)
    subjects, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(subjects) + 1))
    counts = np.diff(starts)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(subjects), len(subjects))
        lens = counts[pick]
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        take = order[np.repeat(starts[pick], lens) + offsets]
        value = auc(y[take], oof[take])
        if np.isfinite(value):
            boots.append(value)
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    return auc(y, oof), float(lo), float(hi), oof


def prediction_table(
    feature_sets: dict[str, np.ndarray],
    covariates: np.ndarray,
    status: np.ndarray,
    phecodes: list[str],
    groups: np.ndarray,
    targets: dict[str, str] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """AUC per target phecode for covariates alone and for each feature set plus covariates.
    Returns the table and the ROC curves (fpr, tpr) per (phecode, model)."""
    targets = targets or TARGETS
    rows, curves = [], {}
    for code, name in targets.items():
        if code not in phecodes:
            continue
        s = status[:, phecodes.index(code)]
        keep = s >= 0
        y = (s[keep] == 1).astype(int)
        models = {"age+sex": covariates[keep]} | {
            fs: np.column_stack([v[keep], covariates[keep]]) for fs, v in feature_sets.items()
        }
        folds = grouped_folds(y, groups[keep], seed=seed)
        for label, x in models.items():
            value, lo, hi, oof = predict_phecode(x, y, groups[keep], seed=seed, folds=folds)
            fpr, tpr, _ = roc_curve(y, oof)
            curves[(code, label)] = (fpr, tpr)
            rows.append(
                {
                    "phecode": code,
                    "target": name,
                    "model": label,
                    "n_cases": int(y.sum()),
                    "n_controls": int(len(y) - y.sum()),
                    "auc": value,
                    "auc_lo": lo,
                    "auc_hi": hi,
                }
            )
    return pd.DataFrame(rows), curves


def intra_class_distance(prototypes: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Mean pairwise cosine distance among each class's prototypes (within a branch's latent space)."""
    rows = []
    for (branch, cls), g in table.groupby(["branch", "class"]):
        if len(g) < 2:
            continue
        v = prototypes[g["prototype"].to_numpy()]
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        cos = v @ v.T
        iu = np.triu_indices(len(v), 1)
        rows.append({"branch": branch, "prototype_class": cls, "mean_cosine_distance": float((1 - cos[iu]).mean())})
    # Columns even when no class keeps two distinct prototypes (after the near-duplicate merge).
    return pd.DataFrame(rows, columns=["branch", "prototype_class", "mean_cosine_distance"])


def mixed_significance_test(
    results: pd.DataFrame, distances: pd.DataFrame, n_perm: int = 5000, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Classes whose prototypes disagree on a phecode (some significant, some not) vs classes whose
    significant phecodes are hit by all their prototypes: are the mixed ones more spread out?"""
    proto = results[results["feature_set"] == "prototype"]
    per = proto.groupby(["prototype_class", "phecode"], observed=True)["significant_bonf"].agg(["sum", "size"])
    per = per[per["sum"] > 0]
    mixed = (per["sum"] < per["size"]).groupby(level=0).any()
    d = distances.merge(mixed.rename("mixed").reset_index(), on="prototype_class", how="inner")
    a = d.loc[d["mixed"], "mean_cosine_distance"].to_numpy()
    b = d.loc[~d["mixed"], "mean_cosine_distance"].to_numpy()
    out = {
        "mixed_classes": float(len(a)),
        "uniform_classes": float(len(b)),
        "mannwhitney_p": np.nan,
        "permutation_p": np.nan,
        "median_distance_mixed": float(np.median(a)) if len(a) else np.nan,
        "median_distance_uniform": float(np.median(b)) if len(b) else np.nan,
    }
    if len(a) and len(b):
        out["mannwhitney_p"] = float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)
        rng = np.random.default_rng(seed)
        pooled, observed = np.concatenate([a, b]), a.mean() - b.mean()
        perm = [(lambda p: p[: len(a)].mean() - p[len(a) :].mean())(rng.permutation(pooled)) for _ in range(n_perm)]
        out["permutation_p"] = float((1 + np.sum(np.asarray(perm) >= observed)) / (1 + n_perm))
    return d, out
