"""Prototype layers: scaled cosine similarity of latent windows to learned prototypes, pooled.

One pooling rule (max, or mean of the top k windows) is used in training, projection and
explanation alike, so the window an explanation shows is the window the loss saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    def __init__(self, n_prototypes: int, dim: int, scale: float, pool: str = "max", topk: int = 3,
                 positive: bool = False) -> None:
        super().__init__()
        init = torch.rand(n_prototypes, dim) if positive else torch.randn(n_prototypes, dim)  # where latents live
        self.prototypes = nn.Parameter(init)
        self.scale = scale
        self.pool_mode = pool
        self.topk = topk

    def similarity_map(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W, D) latent windows -> (B, W, P) scaled cosine similarities."""
        return self.scale * F.normalize(windows, dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def pool(self, sim_map: torch.Tensor) -> torch.Tensor:
        """(B, W, P) -> (B, P)."""
        if self.pool_mode == "max" or sim_map.shape[1] == 1:
            return sim_map.amax(dim=1)
        if self.pool_mode == "focal":  # best window minus the average window: high only where the match is local
            return sim_map.amax(dim=1) - sim_map.mean(dim=1)
        k = min(self.topk, sim_map.shape[1])
        return sim_map.topk(k, dim=1).values.mean(dim=1)

    def best_window(self, sim_map: torch.Tensor) -> torch.Tensor:
        """(B, W, P) -> (B, P) index of the best-matching window (the one a projection or an explanation shows)."""
        return sim_map.argmax(dim=1)


def diversity(prototypes: torch.Tensor) -> torch.Tensor:
    """|| P^ P^T - I ||_F^2 / P^2 over row-normalised prototypes: 0 when they are orthogonal."""
    p = F.normalize(prototypes.flatten(1), dim=1)
    eye = torch.eye(p.shape[0], device=p.device, dtype=p.dtype)
    return ((p @ p.T - eye) ** 2).sum() / p.shape[0] ** 2
