"""Losses of the joint, last-layer and fusion stages, in the ProtoPNet-faithful multi-label forms.

Shapes: sims (B, P) pooled similarities, targets (B, C) multi-hot, identity (P, C) one-hot of each
prototype's class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ecgproto.model.prototypes import diversity

if TYPE_CHECKING:
    from ecgproto.train.config import LossWeights

__all__ = [
    "bce",
    "clustering",
    "contrastive",
    "diversity",
    "jaccard",
    "joint_loss",
    "pos_weight",
    "separation",
    "soft_targets",
]


def pos_weight(targets: np.ndarray) -> torch.Tensor:
    """(T - n_c) / n_c with T the total positive labels in train; classes without positives get 1."""
    n = targets.sum(axis=0).astype(np.float64)
    total = n.sum()
    w = np.where(n > 0, (total - n) / np.maximum(n, 1), 1.0)
    return torch.as_tensor(w, dtype=torch.float32)


def jaccard(targets: np.ndarray) -> np.ndarray:
    """(C, C) label co-occurrence |a & b| / |a | b| over the training records; diagonal 1."""
    y = targets.astype(np.float64)
    both = y.T @ y
    n = y.sum(axis=0)
    either = n[:, None] + n[None, :] - both
    j = np.divide(both, either, out=np.zeros_like(both), where=either > 0)
    np.fill_diagonal(j, 1.0)
    return j


def bce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)


def soft_targets(labels: torch.Tensor, teacher: torch.Tensor | None, distill: float) -> torch.Tensor:
    """(1 - distill) x labels + distill x teacher scores: the BCE is linear in its target, so this is the same as
    mixing the BCE on the labels and the BCE on the teacher's scores in that proportion."""
    if teacher is None or distill == 0:
        return labels
    return (1 - distill) * labels + distill * teacher.to(labels)


def clustering(sims: torch.Tensor, targets: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Minus the mean, over positive (record, class) cells, of the best similarity among that class's prototypes."""
    own_best = _class_max(sims, identity)  # (B, C)
    pos = targets > 0
    if not pos.any():
        return sims.new_zeros(())
    return -own_best[pos].mean()


def separation(sims: torch.Tensor, targets: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Mean over records of the best similarity to prototypes of classes the record does not have."""
    foreign = (targets @ identity.T) == 0  # (B, P): prototype's class absent from the record
    masked = sims.masked_fill(~foreign, float("-inf")).amax(dim=1)
    keep = foreign.any(dim=1)
    return masked[keep].mean() if keep.any() else sims.new_zeros(())


def contrastive(prototypes: torch.Tensor, identity: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """-(sum S*M+ - sum S*M-) / sqrt(P): pull prototypes of the same or co-occurring classes together."""
    p = F.normalize(prototypes.flatten(1), dim=1)
    s = p @ p.T
    m_pos = identity @ jac @ identity.T
    m_neg = 1 - m_pos
    m_pos = m_pos / m_pos.sum()
    m_neg = m_neg / m_neg.sum().clamp(min=1e-12)
    return -((s * m_pos).sum() - (s * m_neg).sum()) / p.shape[0] ** 0.5


def _class_max(sims: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """(B, P) -> (B, C): per class, the best similarity among its prototypes."""
    masked = sims.unsqueeze(2).masked_fill(identity.unsqueeze(0) == 0, float("-inf"))
    return masked.amax(dim=1)


def joint_loss(
    logits: torch.Tensor,
    sims: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    identity: torch.Tensor,
    jac: torch.Tensor,
    weight: torch.Tensor | None,
    w: LossWeights,
    parts: dict[str, torch.Tensor] | None = None,
    teacher: torch.Tensor | None = None,
) -> torch.Tensor:
    """The joint stage's objective: BCE + clustering + separation + diversity + contrastive co-occurrence.
    `parts`, when given, receives each weighted term (detached): the curves that say why the sum moves (the
    clustering and contrastive terms are minus similarities, so the total can be negative). With `teacher` (B, C)
    scores in [0, 1], the BCE aims at `soft_targets` (w.distill of the way to the teacher); the clustering and
    separation terms keep the labels (which prototypes a record should be near)."""
    logits, sims = logits.float(), sims.float()
    terms = {
        "bce": bce(logits, soft_targets(targets, teacher, w.distill), weight),
        "clustering": w.clustering * clustering(sims, targets, identity),
        "separation": w.separation * separation(sims, targets, identity),
        "diversity": w.diversity * diversity(prototypes),
        "contrastive": w.contrastive * contrastive(prototypes, identity, jac),
    }
    if parts is not None:
        parts.update({k: v.detach() for k, v in terms.items()})
    return torch.stack(list(terms.values())).sum()
