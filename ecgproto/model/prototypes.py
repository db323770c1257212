"""Prototype layers: similarity of latent windows to learned prototypes, pooled.

Similarity, from the cosine c of a window with a prototype (either form lies in [-scale, scale]):

  cosine      scale * c (the reference)
  exp_cosine  scale * (2 exp(c - 1) - 1): flat far from the prototype, steep near it, so a
              record scores high only when its latent lies near the prototype. Under plain cosine a
              one-window branch's similarity is linear in the prototype's direction, the joint stage
              turns prototypes into discriminant directions that no real latent lies near, and the
              projection onto real ECGs costs accuracy; rewarding nearness keeps them where the data is.

One pooling rule is used in training, evaluation and explanation alike, so the window an
explanation shows is the window the loss saw (projection moves each prototype onto a real window:
the nearest under max over many windows, the most faithful to the pooled similarities otherwise, see
ecgproto.train.projection):

  max        the best window (ProtoPNet, the reference)
  lead_mean  windows laid out as (rows, columns) of a lead x time grid: per lead row, the mean
             over time; then the best row. A morphology recurs in every beat, so its evidence is
             how well it matches along the whole strip of one lead group; the window shown is the
             best window of that row.
  beat       the branch hands one latent per lead group: the mean over the record's beats of each
             beat window's latent (see ecgproto.model.branch). Each prototype belongs to one lead
             group (`group`) and is compared with that group only: a morphology in V1-V3 is never
             matched to II, aVF, III. Projection makes the prototype one real beat of one record.

(Poolings tried and retired, with what they measured, are in docs/experiments.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("max", "lead_mean", "beat")


class PrototypeLayer(nn.Module):
    def __init__(
        self,
        n_prototypes: int,
        dim: int,
        scale: float,
        pool: str = "max",
        rows: int = 1,
        similarity: str = "cosine",
        group: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim))  # where standardised latents live
        self.scale = scale
        self.pool_mode = pool
        self.rows = rows  # lead_mean: window index = row * (W // rows) + column
        if similarity not in ("cosine", "exp_cosine"):
            raise ValueError(f"unknown similarity {similarity!r}; choose cosine or exp_cosine")
        self.similarity = similarity
        if pool == "beat":
            if group is None or group.shape != (n_prototypes,):
                raise ValueError("beat pooling needs the lead group of every prototype")
            self.register_buffer("group", group.long())  # (P,) the lead group each prototype is compared with

    def cosine_map(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W, D) latent windows -> (B, W, P) cosines with the prototypes."""
        return F.normalize(windows, dim=-1) @ F.normalize(self.prototypes, dim=-1).T

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """Cosines -> similarities (increasing in the cosine, in [-scale, scale])."""
        if self.similarity == "exp_cosine":
            return self.scale * (2 * torch.exp(cos - 1) - 1)
        return self.scale * cos

    def similarity_map(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W, D) latent windows -> (B, W, P) similarities."""
        return self.from_cosine(self.cosine_map(windows))

    def pool(self, sim_map: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """(B, W, P) -> (B, P). Beat pooling: W are lead groups, each prototype takes its own (`group` (P,)
        overrides the layer's, for prototypes other than its own, e.g. projection's candidates)."""
        if self.pool_mode == "beat":
            g = self.group if group is None else group
            return sim_map.gather(1, g.view(1, 1, -1).expand(sim_map.shape[0], 1, -1)).squeeze(1)
        if self.pool_mode == "lead_mean" and sim_map.shape[1] > 1:
            return self._rows(sim_map).mean(dim=2).amax(dim=1)
        return sim_map.amax(dim=1)

    def best_window(self, sim_map: torch.Tensor) -> torch.Tensor:
        """(B, W, P) -> (B, P) index of the best-matching window (the one an explanation shows)."""
        if self.pool_mode == "beat":  # its own lead group (which beat of it: Branch.best_beat)
            return self.group.view(1, -1).expand(sim_map.shape[0], -1)
        if self.pool_mode != "lead_mean" or sim_map.shape[1] == 1:
            return sim_map.argmax(dim=1)
        grid = self._rows(sim_map)  # (B, R, T, P)
        row = grid.mean(dim=2).argmax(dim=1)  # (B, P) the row that sets the pooled similarity
        in_row = grid.gather(1, row[:, None, None, :].expand(-1, 1, grid.shape[2], -1)).squeeze(1)  # (B, T, P)
        return row * grid.shape[2] + in_row.argmax(dim=1)

    def _rows(self, sim_map: torch.Tensor) -> torch.Tensor:
        b, w, p = sim_map.shape
        if w % self.rows:
            raise ValueError(f"{w} windows do not form {self.rows} rows")
        return sim_map.view(b, self.rows, w // self.rows, p)


def diversity(prototypes: torch.Tensor) -> torch.Tensor:
    """|| P^ P^T - I ||_F^2 / P^2 over row-normalised prototypes: 0 when they are orthogonal."""
    p = F.normalize(prototypes.flatten(1), dim=1)
    eye = torch.eye(p.shape[0], device=p.device, dtype=p.dtype)
    return ((p @ p.T - eye) ** 2).sum() / p.shape[0] ** 2
