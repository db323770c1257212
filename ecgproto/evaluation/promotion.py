"""Champion/challenger: is a retrained model good enough to replace the one in use?

Both models are scored on the same data (the current store's test fold), so the comparison is like
for like even when the champion was trained on older data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ecgproto.data.store import ArrayStore
from ecgproto.evaluation.metrics import macro_auroc


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    challenger_auroc: float
    champion_auroc: float | None
    tolerance: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def decide(challenger_auroc: float, champion_auroc: float | None, tolerance: float) -> PromotionDecision:
    """Promote unless the challenger is worse than the champion by more than `tolerance`
    (a negative tolerance demands an improvement of at least that much)."""
    if not np.isfinite(challenger_auroc):
        return PromotionDecision(
            False, "challenger macro-AUROC is not finite", challenger_auroc, champion_auroc, tolerance
        )
    if champion_auroc is None:
        return PromotionDecision(
            True, "the first champion of this model name (none to compare with)", challenger_auroc, None, tolerance
        )
    bar = champion_auroc - tolerance
    if challenger_auroc >= bar:
        return PromotionDecision(
            True,
            f"challenger {challenger_auroc:.4f} >= champion {champion_auroc:.4f} - tolerance {tolerance:g}",
            challenger_auroc,
            champion_auroc,
            tolerance,
        )
    return PromotionDecision(
        False,
        f"challenger {challenger_auroc:.4f} < champion {champion_auroc:.4f} - tolerance {tolerance:g} = {bar:.4f}",
        challenger_auroc,
        champion_auroc,
        tolerance,
    )


@torch.no_grad()
def test_fold_auroc(model: torch.nn.Module, store: ArrayStore, split: str = "test", batch_size: int = 256) -> float:
    """Whole-fold macro-AUROC of a model's probabilities on one split of a labelled store."""
    if store.labels is None:
        raise ValueError(f"{store.path}: no labels; champion/challenger needs a PTB-XL-layout store")
    m = store.manifest
    rows = np.sort(m.loc[m["split"] == split, "row"].to_numpy())
    if len(rows) == 0:
        raise ValueError(f"{store.path}: split {split!r} is empty")
    model = model.eval().cpu()
    probs = [
        model(torch.from_numpy(np.asarray(store.signals[rows[i : i + batch_size]], dtype=np.float32))).numpy()
        for i in range(0, len(rows), batch_size)
    ]
    return macro_auroc(np.asarray(store.labels[rows]), np.concatenate(probs))
