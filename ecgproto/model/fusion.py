"""Fusion over the frozen, projected branches: all prototype similarities -> the 71 labels.

Blocks are normalised (each branch's similarities divided by its scale, so every block lies in
[-1, 1] and 1 means "this ECG is the prototype"), and the weights are non-negative with an L1
penalty off the own class: a prototype can only add evidence, and each case's evidence is weight x
similarity. (The reference's signed dense layer and an own-class-only layer were tried and retired:
docs/experiments.md.)
"""

from __future__ import annotations

import torch
from torch import nn

from ecgproto.model.config import FusionConfig


class _FusionFamily(nn.Module):
    """What the main fusion head and its bootstrap heads share: non-negative weights (..., L, P), the label x
    prototype mask `own`, the L1 off each label's own prototypes, and the projection back to >= 0 after each
    update."""

    own: torch.Tensor
    weight: nn.Parameter

    def __init__(self, prototype_label: torch.Tensor, n_labels: int) -> None:
        super().__init__()
        self.register_buffer("own", nn.functional.one_hot(prototype_label, n_labels).float().T)  # (L, P)

    def initial_weight(self) -> torch.Tensor:
        """(L, P): each label's own prototypes share a weight of 4, the others 0."""
        return self.own / self.own.sum(dim=1, keepdim=True).clamp(min=1) * 4.0

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def off_class_l1(self) -> torch.Tensor:
        return (self.weight.abs() * (1 - self.own)).sum()

    @torch.no_grad()
    def constrain(self) -> None:
        """Projected gradient step: keep the weights non-negative after each update."""
        self.weight.clamp_(min=0)


class Fusion(_FusionFamily):
    def __init__(self, prototype_label: torch.Tensor, scales: torch.Tensor, n_labels: int, cfg: FusionConfig) -> None:
        super().__init__(prototype_label, n_labels)
        self.register_buffer("inv_scale", (1.0 / scales) if cfg.normalise else torch.ones_like(scales))
        self.weight = nn.Parameter(self.initial_weight())
        self.bias = nn.Parameter(torch.full((n_labels,), -2.0))

    def normalised(self, sims: torch.Tensor) -> torch.Tensor:
        return sims * self.inv_scale

    def forward(self, sims: torch.Tensor) -> torch.Tensor:
        """(B, P) raw branch similarities -> (B, L) logits."""
        return self.normalised(sims) @ self.effective_weight().T + self.bias

    def contributions(self, sims: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, L, P): each prototype's share of each label's logit (weight x similarity)."""
        return self.normalised(sims).unsqueeze(1) * self.effective_weight().unsqueeze(0)


class FusionHeads(_FusionFamily):
    """K more fusion heads of the same family, each fitted on a bootstrap resample of the training records
    (Poisson weights), stacked so one pass trains them all. They leave the model's prediction alone (that is
    the main head's, whose weights the explanations show) and say how much it depends on which records the
    last layer saw: where the heads disagree, the prediction is uncertain."""

    def __init__(self, prototype_label: torch.Tensor, n_labels: int, n_heads: int) -> None:
        super().__init__(prototype_label, n_labels)
        self.weight = nn.Parameter(self.initial_weight().expand(n_heads, -1, -1).clone())  # (K, L, P)
        self.bias = nn.Parameter(torch.full((n_heads, n_labels), -2.0))

    @property
    def n_heads(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, P) normalised similarities (Fusion.normalised) -> (K, B, L) logits."""
        return torch.einsum("bp,klp->kbl", normalised, self.effective_weight()) + self.bias.unsqueeze(1)
