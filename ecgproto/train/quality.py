"""How good is each prototype as a case? Measured once, right after projection, on training ECGs.

- purity: the share of the prototype's k nearest training ECGs (highest pooled similarity, the number the
  model uses) that carry its class. A prototype projected onto another class's ECG, or one that matches
  every ECG alike, has a low purity. `class_share` beside it is the class's share of the training ECGs,
  what purity would be by chance (most classes are rare: a purity of 0.3 for a class of 1% is 30 times it).
- consistency: how alike those k nearest ECGs are where the prototype looks at them: the mean pairwise
  cosine of their latents in its window (its lead group, for a beat prototype). A prototype whose
  neighbours share one morphology scores high; one that collects unrelated ECGs scores low. (Beat
  prototypes are compared only with R-aligned beats of their own lead group, so "the same leads and the
  same beat part" holds by construction; what can still vary is whether the matched beats look alike.)
- stability: 1 - the mean change of its similarity with those k ECGs, over the similarity scale, under
  perturbations at ECG noise level: Gaussian noise (15 uV), baseline wander (0.1 mV at 0.3 Hz) and a time
  shift (40 ms). 1: the match does not move; a match that a little noise breaks is not a case to trust.
- near-duplicates: the prototype of the same branch (and lead group) whose latent is closest, its cosine,
  and `duplicate` where that cosine is >= 0.95 or both sit on the same source window (two names for one
  case).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ecgproto.model.branch import Branch
from ecgproto.train.data import SplitData

QUALITY_COLUMNS = (
    "purity",
    "class_share",
    "consistency",
    "stability",
    "nearest_prototype",
    "nearest_prototype_cos",
    "duplicate",
)
DUPLICATE_COS = 0.95
NOISE_MV, WANDER_MV, WANDER_HZ, SHIFT_S = 0.015, 0.1, 0.3, 0.04


def perturbations(
    x: torch.Tensor, beats: torch.Tensor, fs: float, seed: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, x', beats') for each perturbation of a batch (B, 12, n) mV, seeded (the same draws every run)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[-1]
    yield "noise", x + NOISE_MV * torch.randn(x.shape, generator=g), beats
    t = torch.arange(n, dtype=torch.float32) / fs
    phase = 2 * np.pi * torch.rand(x.shape[0], x.shape[1], 1, generator=g)
    yield "wander", x + WANDER_MV * torch.sin(2 * np.pi * WANDER_HZ * t + phase), beats
    s = int(round(SHIFT_S * fs))
    shifted = torch.where(beats >= 0, beats + s, beats)
    yield "shift", torch.roll(x, s, dims=-1), shifted.masked_fill(shifted >= n, -1)


@torch.no_grad()
def prototype_quality(
    branch: Branch,
    train: SplitData,
    label_index: np.ndarray,
    fs: float,
    k: int = 20,
    records: int = 2048,
    batch_size: int = 64,
    device: torch.device | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per prototype of the (projected) `branch`, in its order: QUALITY_COLUMNS, measured on `records`
    training ECGs (all of them, or a seeded sample). `nearest_prototype` is an index within the branch."""
    device = device or torch.device("cpu")
    branch.eval().to(device)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(train), min(records, len(train)), replace=False))
    k = min(k, len(sample))
    protos = branch.prototypes
    p = branch.n_prototypes

    def batches() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for i in range(0, len(sample), batch_size):
            idx = sample[i : i + batch_size]
            yield i, torch.as_tensor(train.signals(idx)), torch.as_tensor(train.beats(idx))

    # pass 1: pooled similarities with the sampled ECGs, as they are and perturbed
    sims = torch.empty(len(sample), p)
    moved = torch.zeros(len(sample), p)
    for i, x, beats in batches():
        sims[i : i + len(x)] = branch(x.to(device), beats.to(device))[1].float().cpu()
        for _, xp, bp in perturbations(x, beats, fs, seed + i + 1):
            s = branch(xp.to(device), bp.to(device))[1].float().cpu()
            moved[i : i + len(x)] += (s - sims[i : i + len(x)]).abs() / 3
    near = sims.topk(k, dim=0).indices  # (k, P) each prototype's k nearest sampled ECGs
    cls = branch.prototype_class.cpu().numpy()
    y = train.labels[sample][:, label_index]  # (n, C)
    purity = y[near.numpy(), cls[None, :]].mean(axis=0)
    class_share = y.mean(axis=0)[cls]  # what purity would be by chance: the class's share of the sampled ECGs
    stability = 1 - moved.gather(0, near).mean(dim=0).numpy() / branch.scale
    # pass 2: the k nearest ECGs' latents in each prototype's window -> their mean pairwise cosine
    member = torch.zeros(len(sample), p, dtype=torch.bool)
    member.scatter_(0, near, True)
    total = torch.zeros(p, protos.prototypes.shape[1])
    for i, x, beats in batches():
        windows = branch.latent_windows(x.to(device), beats.to(device)).float()  # (B, W, D)
        best = protos.best_window(protos.similarity_map(windows))  # (B, P)
        unit = F.normalize(windows, dim=-1)
        picked = unit.gather(1, best.unsqueeze(-1).expand(-1, -1, unit.shape[-1])).cpu()  # (B, P, D)
        total += (picked * member[i : i + len(x)].unsqueeze(-1)).sum(dim=0)
    consistency = ((total.pow(2).sum(dim=1) - k) / (k * (k - 1))).numpy() if k > 1 else np.ones(p)
    nearest, nearest_cos = _nearest_prototypes(branch)
    out = pd.DataFrame(
        {
            "purity": purity,
            "class_share": class_share,
            "consistency": consistency,
            "stability": stability,
            "nearest_prototype": nearest,
            "nearest_prototype_cos": nearest_cos,
            "duplicate": nearest_cos >= DUPLICATE_COS,
        }
    )
    merged = ~branch.distinct.cpu().numpy()  # no case of their own: their keeper's row speaks for them
    out.loc[merged, ["purity", "consistency", "stability", "nearest_prototype_cos"]] = np.nan
    out.loc[merged, "nearest_prototype"] = -1
    return out


def prototype_cosines(branch: Branch) -> torch.Tensor:
    """(P, P) cosines between the branch's prototypes; -inf between beat prototypes of different lead groups (they
    never look at the same leads, so they are never one case)."""
    z = F.normalize(branch.prototypes.prototypes.detach().float().cpu(), dim=-1)
    cos = z @ z.T
    if branch.beat:
        g = branch.prototypes.group.cpu()
        cos = cos.masked_fill(g[:, None] != g[None, :], -np.inf)
    return cos


def _nearest_prototypes(branch: Branch) -> tuple[np.ndarray, np.ndarray]:
    """Each prototype's closest other prototype in the branch (within its lead group for beat prototypes)."""
    cos = prototype_cosines(branch)
    cos.fill_diagonal_(-np.inf)
    merged = ~branch.distinct.cpu()
    cos[:, merged] = -np.inf  # only distinct prototypes count as another case
    cos[merged, :] = -np.inf
    value, index = cos.max(dim=1)
    return np.where(np.isfinite(value.numpy()), index.numpy(), -1), np.nan_to_num(value.numpy(), neginf=np.nan)


def mark_shared_sources(provenance: pd.DataFrame) -> pd.DataFrame:
    """`duplicate` also where two distinct prototypes of a branch sit on the same source window."""
    out = provenance.copy()
    distinct = is_distinct(out)
    key = out[["branch", "ecg_id", "start_s", "end_s", "leads"]].astype(str).agg("|".join, axis=1)
    shared = key.where(distinct).duplicated(keep=False).to_numpy() & distinct
    out["duplicate"] = out["duplicate"].astype(bool) | shared
    return out


def is_distinct(provenance: pd.DataFrame) -> np.ndarray:
    """(rows,) bool: the provenance rows of distinct prototypes (all of them before merging existed)."""
    if "merged_into" not in provenance:
        return np.ones(len(provenance), dtype=bool)
    return (provenance["merged_into"].to_numpy() == provenance["prototype"].to_numpy()).astype(bool)


def distinct_cases(provenance: pd.DataFrame) -> pd.DataFrame:
    """Per branch and class: prototypes configured, distinct cases after merging near-duplicates, and how many of
    those sit on an ECG of their own class (what the gallery shows a reviewer per class)."""
    t = provenance.assign(distinct=is_distinct(provenance))
    own = t["own_class_source"].astype(bool) if "own_class_source" in t else pd.Series(True, index=t.index)
    t = t.assign(own_distinct=t["distinct"] & own)
    out = t.groupby(["branch", "class"], sort=False).agg(
        prototypes=("prototype", "size"),
        distinct=("distinct", "sum"),
        distinct_own_class_source=("own_distinct", "sum"),
    )
    return out.reset_index()


def quality_summary(provenance: pd.DataFrame) -> pd.DataFrame:
    """Per branch: prototypes, mean and lowest-decile purity / consistency / stability, duplicates."""
    rows = []
    for name, g in provenance.groupby("branch", sort=False):
        distinct = is_distinct(g)
        row: dict[str, object] = {"branch": name, "prototypes": len(g), "distinct": int(distinct.sum())}
        g = g[distinct]  # a merged prototype is its keeper's case
        for c in ("purity", "consistency", "stability"):
            row[f"{c}_mean"] = float(g[c].mean())
            row[f"{c}_p10"] = float(g[c].quantile(0.1))
        if "class_share" in g:  # purity by chance, for scale: most classes are rare
            row["class_share_mean"] = float(g["class_share"].mean())
        row["duplicates"] = int(g["duplicate"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def quality_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Metrics for the training run: quality.<branch>.<measure>_mean / _p10 and .duplicates."""
    out: dict[str, float] = {}
    for row in summary.to_dict(orient="records"):
        for key, value in row.items():
            if key not in ("branch", "prototypes"):  # "distinct" stays: how many cases the branch shows
                out[f"quality.{row['branch']}.{key}"] = float(value)
    return out


def quality_figure(provenance: pd.DataFrame) -> Figure:
    """The prototype-quality overview: per measure, the distribution over each branch's prototypes."""
    measures = (
        ("purity", "class purity: share of its 20 nearest training ECGs with its class (chance: the class's share)"),
        ("consistency", "consistency: mean cosine among those 20 ECGs in its window"),
        ("stability", "stability: 1 - similarity change / scale under noise, wander, shift"),
    )
    fig = Figure(figsize=(15, 4.4))
    axes = fig.subplots(1, len(measures))
    bins = np.linspace(0, 1, 21)
    for ax, (column, title) in zip(axes, measures, strict=True):
        for name, g in provenance.groupby("branch", sort=False):
            values = g[column].clip(0, 1).dropna()
            label = f"{name} (mean {values.mean():.2f}"
            if column == "purity" and "class_share" in g:
                label += f"; chance {g['class_share'].mean():.2f}"
            ax.hist(values, bins=bins, histtype="step", lw=1.5, label=label + ")")
        ax.set_title(textwrap.fill(title, 48), fontsize=9)
        ax.set_xlabel(column)
        ax.set_ylabel("prototypes")
        ax.legend(fontsize=7, loc="upper left")
    dup = int(provenance["duplicate"].sum())
    fig.suptitle(
        f"prototype quality, measured at projection on training ECGs; {dup} prototypes have a near-duplicate "
        f"(cosine >= {DUPLICATE_COS} or the same source window)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
