"""Association figures: Manhattan, prototype x phecode heatmap, feature-set comparison, ROC curves,
intra-class distances. Each returns a Figure built outside pyplot (Agg), never shown."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

FEATURE_SETS = {  # what a feature set's odds ratio is per, for titles
    "prototype": "prototype similarity; OR per SD",
    "prototype_top1": "prototype is its branch's best match (share of a subject's ECGs); OR all vs none",
    "prototype_class": "a class's best prototype similarity; OR per SD",
    "class_prob": "fused class log-odds; OR per SD",
    "nlp_concept": "machine-report statement; OR present vs absent",
}


def manhattan(results: pd.DataFrame, feature_set: str, alpha: float = 0.05, top: int = 8) -> Figure:
    """Phecodes on x grouped by category (named under the axis), -log10 p on y, triangles up/down for
    OR above/below 1, Bonferroni and BH-FDR lines; the strongest hits numbered, named in a side table
    (labels on the points would overlap)."""
    r = results.dropna(subset=["p_value"]).copy()
    r["phecode_num"] = pd.to_numeric(r["phecode"].astype(str).str.extract(r"([\d.]+)")[0], errors="coerce")
    order = r.drop_duplicates("phecode").sort_values(["phecode_category", "phecode_num"])
    x_of = {p: i for i, p in enumerate(order["phecode"].astype(str))}
    fig = Figure(figsize=(14, 5.5))
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3.2, 1]})
    cats = list(dict.fromkeys(order["phecode_category"].astype(str)))
    palette = ["#1f4e79", "#7f7f7f"]  # alternating, so neighbouring categories part visibly
    ticks, names = [], []
    for k, cat in enumerate(cats):
        g = r[r["phecode_category"].astype(str) == cat]
        x = g["phecode"].astype(str).map(x_of).to_numpy()
        up = g["beta"].to_numpy() > 0
        colour = palette[k % 2]
        ax.scatter(x[up], g["neg_log_p"].to_numpy()[up], marker="^", s=14, color=colour)
        ax.scatter(x[~up], g["neg_log_p"].to_numpy()[~up], marker="v", s=14, color=colour)
        ticks.append(float(np.mean([x_of[p] for p in g["phecode"].astype(str).unique()])))
        names.append(cat)
    ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    handles = [
        ax.scatter([], [], marker="^", color="black", s=14, label="OR > 1"),
        ax.scatter([], [], marker="v", color="black", s=14, label="OR < 1"),
    ]
    lines = []
    if len(r):
        bonf = float(r["bonferroni_threshold"].iloc[0])
        lines.append(ax.axhline(-np.log10(bonf), color="red", lw=1, ls="--", label=f"Bonferroni (p < {bonf:.1e})"))
        n_fdr = int((r["q_fdr"] < alpha).sum())
        if n_fdr:  # the Benjamini-Hochberg critical p of the last significant rank
            lines.append(
                ax.axhline(
                    -np.log10(n_fdr * alpha / len(r)),
                    color="orange",
                    lw=1,
                    ls=":",
                    label=f"FDR {alpha:g} (BH; {n_fdr} pairs)",
                )
            )
    side.legend(handles=handles + lines, fontsize=7, loc="lower left")  # beside the plot, never over a point
    ax.set_ylabel("-log10 p")
    n_phecodes = r["phecode"].nunique()
    ax.set_title(
        f"{feature_set}: {FEATURE_SETS.get(feature_set, feature_set)}\n{len(r):,} tests ({r['feature_id'].nunique()} "
        f"features x {n_phecodes} phecodes), logistic regression on age and sex",
        fontsize=9,
    )
    side.set_axis_off()
    hits = r.sort_values("p_value").drop_duplicates("phecode").head(top)
    hits = hits[hits["significant_bonf"].astype(bool)]
    rows = []
    for i, (_, t) in enumerate(hits.iterrows(), 1):
        ax.annotate(
            str(i),
            (x_of[str(t["phecode"])], t["neg_log_p"]),
            fontsize=7,
            xytext=(2, 2),
            textcoords="offset points",
            fontweight="bold",
        )
        rows.append(
            f"{i}. {t['phecode']} {str(t['phecode_string'])[:40]}\n    {str(t['feature_label'])[:40]}\n"
            f"    OR {t['odds_ratio']:.2f}, p {t['p_value']:.1e}"
        )
    side.text(
        0,
        1,
        "strongest Bonferroni-significant hit per phecode\n\n" + ("\n".join(rows) if rows else "none"),
        va="top",
        ha="left",
        fontsize=7,
        family="monospace",
        transform=side.transAxes,
    )
    fig.tight_layout()
    return fig


def heatmap(results: pd.DataFrame, max_features: int = 40, max_phecodes: int = 30) -> Figure:
    """Signed -log10 p of the strongest prototypes x phecodes."""
    r = results.dropna(subset=["p_value"])
    feats = r.groupby("feature_label", observed=True)["neg_log_p"].max().nlargest(max_features).index
    codes = r.groupby("phecode", observed=True)["neg_log_p"].max().nlargest(max_phecodes).index
    sub = r[r["feature_label"].isin(feats) & r["phecode"].isin(codes)]
    signed = sub.assign(v=np.sign(sub["beta"]) * sub["neg_log_p"])
    labels = sub.drop_duplicates("phecode").set_index("phecode")["phecode_string"].astype(str)
    # phecodes as rows: their names read horizontally, whole, at the artifact viewer's width
    grid = signed.pivot_table(index="phecode", columns="feature_label", values="v", observed=True).reindex(
        index=codes, columns=feats
    )
    fig = Figure(figsize=(10, max(4.5, 0.3 * len(codes) + 3)))
    ax = fig.subplots()
    lim = max(float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0, 1.0)
    im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(codes)), [f"{c} {labels.get(c, '')[:42]}" for c in codes], fontsize=9)
    ax.set_xticks(range(len(feats)), list(feats), rotation=90, fontsize=8)
    fig.colorbar(im, ax=ax, label="sign(beta) x -log10 p")
    ax.set_title(
        f"prototype x phecode: the {len(feats)} strongest prototypes x {len(codes)} phecodes\n"
        "logistic regression on age and sex; red: higher activation with the phecode",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def feature_set_comparison(strength: pd.DataFrame) -> Figure:
    """Significant phecodes per category, one bar per feature set."""
    piv = strength.pivot_table(
        index="phecode_category", columns="feature_set", values="significant_phecodes", aggfunc="sum", fill_value=0
    )
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(piv.columns), 1)
    for k, fs in enumerate(piv.columns):
        ax.bar(np.arange(len(piv)) + k * width, piv[fs].to_numpy(), width, label=str(fs))
    ax.set_xticks(np.arange(len(piv)) + 0.4 - width / 2, list(piv.index), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("Bonferroni-significant phecodes")
    ax.set_title(
        "conditions with a Bonferroni-significant association, by phecode category and feature set\n"
        "(logistic regression on age and sex; a condition counted once)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc_curves(curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], table: pd.DataFrame) -> Figure:
    codes = list(dict.fromkeys(code for code, _ in curves))
    fig = Figure(figsize=(4.2 * max(len(codes), 1), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(codes), 1)))
    for ax, code in zip(axes, codes, strict=False):
        for (c, model), (fpr, tpr) in curves.items():
            if c != code:
                continue
            row = table[(table["phecode"] == code) & (table["model"] == model)].iloc[0]
            ax.plot(fpr, tpr, lw=1.2, label=f"{model}: {row['auc']:.2f} [{row['auc_lo']:.2f}, {row['auc_hi']:.2f}]")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{code} {table.loc[table['phecode'] == code, 'target'].iloc[0]}")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def distance_plot(d: pd.DataFrame, summary: dict[str, float]) -> Figure:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    groups = [d.loc[d["mixed"], "mean_cosine_distance"], d.loc[~d["mixed"], "mean_cosine_distance"]]
    ax.boxplot([g.to_numpy() for g in groups], tick_labels=["mixed", "uniform"])
    for k, g in enumerate(groups):
        ax.scatter(np.full(len(g), k + 1) + np.random.default_rng(k).uniform(-0.08, 0.08, len(g)), g, s=10)
    ax.set_ylabel("mean pairwise cosine distance")
    ax.set_title(f"prototype classes (MWU p={summary.get('mannwhitney_p', float('nan')):.2g})", fontsize=9)
    fig.tight_layout()
    return fig
