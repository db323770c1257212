"""The black-box baseline: a plain 1D ResNet-18 over the 12 leads, same data and split."""

from __future__ import annotations

import torch
from torch import nn

from ecgproto.model.backbones import Backbone1D
from ecgproto.model.config import BackboneConfig


class ResNet1DClassifier(nn.Module):
    def __init__(
        self,
        n_labels: int,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        n_leads: int = 12,
    ) -> None:
        super().__init__()
        self._spec = {
            "n_labels": int(n_labels),
            "widths": list(widths),
            "blocks": list(blocks),
            "n_leads": int(n_leads),
        }
        self.backbone = Backbone1D(BackboneConfig(widths=widths, blocks=blocks), n_leads)
        self.head = nn.Linear(widths[-1], n_labels)

    def spec(self) -> dict[str, object]:
        """What the constructor needs to build this network again (saved beside its weights)."""
        return dict(self._spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 12, n) -> (B, L) logits."""
        return self.head(self.backbone(x).mean(dim=-1))
