"""The feature sets an association study compares, built from a scored cohort and its machine reports.

prototype         per-prototype similarity, z-scored over the cohort (branches differ in scale)
prototype_top1    which prototype of each branch matches best (one-hot)
prototype_class   max z-similarity over a class's prototypes
class_prob        the fused label probabilities, as z-scored logits
nlp_concept       concepts parsed from the machine report lines, hedged statements as their own level
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ecgproto.data.store import ArrayStore
from ecgproto.model.names import prototype_name
from ecgproto.phenotype.engine import FeatureSet
from ecgproto.scoring import KINDS, ActivationStore, calibrated_kinds, score_arrays

HEDGES = ("possible", "probable", "consider", "borderline", "cannot rule out", "suggests", "likely", "questionable")
_PUNCT = re.compile(r"[^a-z0-9+\-/ ]+")


@dataclass
class Scores:
    """What a model says about each cohort ECG: pooled prototype similarities and label probabilities."""

    similarities: np.ndarray  # (n, P) float32
    probabilities: np.ndarray  # (n, C) float32
    prototypes: pd.DataFrame  # one row per prototype: prototype, branch, class, index_in_branch, scale
    codes: tuple[str, ...]
    # (n,) where each ECG's uncertainty falls among the model's validation ECGs (0-100; ECGProtoNet.uncertainty);
    # None: not known (a model without calibration, or an activation store scored before ecgproto stored it)
    percentile: np.ndarray | None = None

    def take(self, at: np.ndarray) -> Scores:
        """The same scores for the ECGs at positions `at`."""
        pct = None if self.percentile is None else self.percentile[at]
        return Scores(self.similarities[at], self.probabilities[at], self.prototypes, self.codes, pct)


def score_cohort(
    model: torch.nn.Module,
    store: ArrayStore,
    rows: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    workers: int = 0,
) -> Scores:
    """Run the model unchanged on the cohort's ECGs (store rows), in batches, streaming from the memmap; with
    each ECG's uncertainty percentile when the model carries its calibration."""
    # the calibrated probabilities are no feature of their own: per label, their z-scored logits are the served ones'
    kinds = KINDS + (("uncertainty",) if "uncertainty" in calibrated_kinds(model) else ())
    out = score_arrays(
        model,
        store,
        rows,
        kinds=kinds,
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        desc="scoring cohort",
    )
    pct = out["uncertainty"][:, 2] if "uncertainty" in out else None
    return Scores(out["similarities"], out["probabilities"], prototype_table(model), tuple(model.codes), pct)


def scores_from_activations(activations: ActivationStore, rows: np.ndarray) -> Scores:
    """The scores of store `rows` read from an activation store (float16, written by `ecgproto score`)."""
    position = pd.Series(activations.records["position"].to_numpy(), index=activations.records["row"].to_numpy())
    missing = ~np.isin(rows, position.index)
    if missing.any():
        raise ValueError(
            f"{activations.path}: {int(missing.sum())} cohort ECGs were not scored "
            f"(store rows e.g. {rows[missing][:3].tolist()}); score the same store"
        )
    take = position.loc[rows].to_numpy()
    sims, probs = activations.take(take, "similarities"), activations.take(take, "probabilities")
    pct = activations.take(take, "uncertainty")[:, 2] if "uncertainty" in activations.kinds else None
    return Scores(sims, probs, activations.prototypes, tuple(activations.info["codes"]), pct)


def prototype_table(model: torch.nn.Module) -> pd.DataFrame:
    rows = []
    for name, offset in model.prototype_offsets().items():
        branch = model.branches[name]
        distinct = branch.distinct.tolist()
        for j, k in enumerate(branch.prototype_class.tolist()):
            if not distinct[j]:  # a merged near-duplicate is its keeper's case: one feature, not two
                continue
            rows.append(
                {
                    "prototype": offset + j,
                    "branch": name,
                    "class": branch.classes[k],
                    "index_in_branch": j,
                    "scale": branch.scale,
                }
            )
    table = pd.DataFrame(rows)
    table["rank_in_class"] = table.groupby(["branch", "class"]).cumcount()
    # Projection pushes a prototype of a class without training positives onto another class's ECG:
    # its name would mislead (a "DIG" prototype showing an LVH record), so studies leave it out by default.
    own = {int(p["prototype"]): bool(p["own_class_source"]) for p in getattr(model, "provenance", [])}
    table["own_class_source"] = [own.get(int(p), True) for p in table["prototype"]]
    return table


def own_class_only(scores: Scores) -> Scores:
    """The same scores, listing only prototypes projected onto an ECG of their own class."""
    keep = scores.prototypes["own_class_source"].to_numpy(bool)
    return replace(scores, prototypes=scores.prototypes[keep].reset_index(drop=True))


def zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _prototype_columns(t: pd.DataFrame) -> pd.DataFrame:
    """Feature id, label (the prototype's one name, `prototype_name`), branch and class of each listed prototype."""
    return pd.DataFrame(
        {
            "feature_id": [f"P{p:04d}" for p in t["prototype"]],
            "feature_label": [
                prototype_name(p, c, b) for p, c, b in zip(t["prototype"], t["class"], t["branch"], strict=True)
            ],
            "branch": t["branch"],
            "prototype_class": t["class"],
        }
    )


def prototype_features(scores: Scores) -> FeatureSet:
    t = scores.prototypes
    return FeatureSet("prototype", zscore(scores.similarities[:, t["prototype"].to_numpy()]), _prototype_columns(t))


def top1_features(scores: Scores) -> FeatureSet:
    t = scores.prototypes
    onehot = np.zeros_like(scores.similarities, dtype=np.float32)
    for _, idx in t.groupby("branch").groups.items():
        cols = t.loc[idx, "prototype"].to_numpy()
        best = cols[scores.similarities[:, cols].argmax(axis=1)]
        onehot[np.arange(len(onehot)), best] = 1.0
    base = _prototype_columns(t)
    return FeatureSet(
        "prototype_top1",
        onehot[:, t["prototype"].to_numpy()],
        base.assign(feature_label=base["feature_label"] + " is top-1"),
    )


def class_features(scores: Scores) -> FeatureSet:
    z = zscore(scores.similarities)
    t = scores.prototypes
    classes = [c for c in scores.codes if c in set(t["class"])]
    values = np.column_stack([z[:, t.loc[t["class"] == c, "prototype"].to_numpy()].max(axis=1) for c in classes])
    branch = t.drop_duplicates("class").set_index("class")["branch"]
    feats = pd.DataFrame(
        {
            "feature_id": [f"class:{c}" for c in classes],
            "feature_label": [f"{c} prototypes (max)" for c in classes],
            "branch": [branch[c] for c in classes],
            "prototype_class": classes,
        }
    )
    return FeatureSet("prototype_class", values.astype(np.float32), feats)


def probability_features(scores: Scores) -> FeatureSet:
    p = np.clip(scores.probabilities.astype(np.float64), 1e-6, 1 - 1e-6)
    branch = scores.prototypes.drop_duplicates("class").set_index("class")["branch"]
    feats = pd.DataFrame(
        {
            "feature_id": [f"prob:{c}" for c in scores.codes],
            "feature_label": [f"P({c})" for c in scores.codes],
            "branch": [branch.get(c, "") for c in scores.codes],
            "prototype_class": list(scores.codes),
        }
    )
    return FeatureSet("class_prob", zscore(np.log(p / (1 - p))), feats)


def normalise_statement(line: str) -> tuple[str, str] | None:
    """A machine report line -> (concept, level 'stated'/'hedged'), or None for an empty line."""
    text = _PUNCT.sub(" ", str(line).lower()).strip()
    text = re.sub(r"\s+", " ", text)
    if not text or text in ("nan", "none"):
        return None
    for hedge in HEDGES:
        if text.startswith(hedge + " "):
            return text[len(hedge) + 1 :].strip(), "hedged"
    return text, "stated"


def nlp_features(reports: pd.DataFrame, min_prevalence: float = 0.001) -> FeatureSet:
    """reports: one row per cohort ECG with report_0..report_17 -> binary concept features."""
    columns = [c for c in reports.columns if re.fullmatch(r"report_\d+", c)]
    if not columns:
        raise ValueError("machine_measurements has no report_N columns (MIMIC-IV-ECG machine_measurements.csv)")
    found: dict[str, set[int]] = {}
    for col in columns:
        for i, line in enumerate(reports[col].to_numpy()):
            parsed = normalise_statement(line) if isinstance(line, str) else None
            if parsed:
                concept, level = parsed
                found.setdefault(f"{concept}|{level}", set()).add(i)
    n = len(reports)
    keep = sorted(k for k, rows in found.items() if len(rows) >= max(min_prevalence * n, 1))
    values = np.zeros((n, len(keep)), dtype=np.float32)
    for j, k in enumerate(keep):
        values[list(found[k]), j] = 1.0
    feats = pd.DataFrame(
        {
            "feature_id": [f"nlp:{k}" for k in keep],
            "feature_label": [k.split("|")[0] + (" (hedged)" if k.endswith("|hedged") else "") for k in keep],
        }
    )
    return FeatureSet("nlp_concept", values, feats)
