"""A branch: backbone -> add-on layers -> prototype similarities -> class-connected head.

  global_1d  rhythm: 1D ResNet, time-averaged (shift-invariant) latent (D,), one window
  local_2d   local morphology: 2D ResNet, windows of `window` feature columns on one lead row;
             with pool="row_latent" one latent per lead row instead: the row's latent averaged over
             time (a morphology recurs in every beat, so its evidence is the whole strip of a lead),
             compared with the prototypes once, the best row scoring
  global_2d  global: 2D ResNet, time-averaged latent per lead row (D x 12): phase-invariant
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecgproto.data.leads import LEADS
from ecgproto.model.backbones import CABRERA, Backbone1D, Backbone2D
from ecgproto.model.config import BranchConfig
from ecgproto.model.prototypes import PrototypeLayer


@dataclass
class WindowExtent:
    """What a window of the latent really sees in the input: samples [start, end) and leads."""

    start: int
    end: int
    leads: tuple[str, ...]
    row: int | None = None
    column: int | None = None


class Branch(nn.Module):
    # Defaults of options added after models were registered: `mlflow.pytorch` pickles whole modules, and a
    # champion pickled before an option existed must still score (the promotion step scores it) as it did then.
    row_latent: bool = False

    def __init__(self, name: str, cfg: BranchConfig, classes: tuple[str, ...], n_leads: int = 12,
                 n_samples: int = 1000) -> None:
        super().__init__()
        self.name, self.kind, self.classes, self.n_samples = name, cfg.kind, tuple(classes), n_samples
        self.row_latent = cfg.pool == "row_latent"  # local_2d only (BranchConfig checks)
        self.window = cfg.window if cfg.kind == "local_2d" and not self.row_latent else 1
        self.window_leads = cfg.window_leads if cfg.kind == "local_2d" else 1
        self.backbone: Backbone1D | Backbone2D = Backbone1D(cfg.backbone, n_leads) if cfg.kind == "global_1d" \
            else Backbone2D(cfg.backbone)
        self._time_columns = self._columns(n_leads, n_samples)  # feature columns of one record (no RNG drawn)
        c, d = self.backbone.out_channels, cfg.latent_dim
        conv = {"global_1d": nn.Linear, "local_2d": nn.Conv2d, "global_2d": nn.Conv1d}[cfg.kind]

        def pointwise(a: int, b: int) -> nn.Module:
            return conv(a, b) if conv is nn.Linear else conv(a, b, 1)

        self.dropout = nn.Dropout(cfg.dropout)
        # local_2d: the per-lead convolutions share weights across leads, so without this a window in V1
        # and the same shape in V5 would be the same latent (an inverted T is normal in V1, not in V5).
        # A learned per-lead offset makes every local latent, and so every prototype, lead-aware.
        self.lead_embedding = nn.Parameter(torch.zeros(1, c, len(CABRERA), 1)) \
            if cfg.kind == "local_2d" and cfg.lead_embedding else None
        norm = {"global_1d": nn.BatchNorm1d, "local_2d": nn.BatchNorm2d, "global_2d": nn.BatchNorm1d}[cfg.kind]
        last = norm(d, affine=False) if cfg.latent == "standardised" else nn.Sigmoid()
        self.add_on = nn.Sequential(pointwise(c, d), nn.ReLU(), pointwise(d, d), last)
        n_rows = len(CABRERA) if cfg.kind == "global_2d" else 1
        per_class = cfg.prototypes_per_class
        self.prototype_dim = d * self.window * self.window_leads * n_rows
        self.prototypes = PrototypeLayer(per_class * len(classes), self.prototype_dim, cfg.scale, cfg.pool, cfg.topk,
                                         positive=cfg.latent == "sigmoid", rows=self.window_grid[0],
                                         similarity=cfg.similarity, sharpness=cfg.sharpness)
        self.register_buffer("prototype_class", torch.arange(len(classes)).repeat_interleave(per_class))
        self.head = nn.Linear(per_class * len(classes), len(classes), bias=False)
        self.reset_head(cfg.head_negative)

    @property
    def n_prototypes(self) -> int:
        return int(self.prototype_class.numel())

    @property
    def window_grid(self) -> tuple[int, int]:
        """(lead rows, time columns) of one record's latent windows, window index = row * columns + column;
        (1, 1) for the global branches (one whole-record latent), (rows, 1) under row_latent."""
        if self.kind != "local_2d":
            return 1, 1
        rows = len(CABRERA) - self.window_leads + 1
        return (rows, 1) if self.row_latent else (rows, self._time_columns - self.window + 1)

    @property
    def n_windows(self) -> int:
        rows, cols = self.window_grid
        return rows * cols

    @property
    def scale(self) -> float:
        return self.prototypes.scale

    def class_identity(self) -> torch.Tensor:
        """(P, C) one-hot: which class each prototype belongs to."""
        return nn.functional.one_hot(self.prototype_class, len(self.classes)).float()

    def reset_head(self, negative: float) -> None:
        with torch.no_grad():
            a = self.class_identity().T
            self.head.weight.copy_(a + negative * (1 - a))

    def _columns(self, n_leads: int, n_samples: int) -> int:
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            cols = int(self.backbone(torch.zeros(1, n_leads, n_samples)).shape[-1])
            self.backbone.train(was)
        return cols

    def latent_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 12, n) -> (B, W, D') latent windows the prototypes are compared with."""
        f = self.dropout(self.backbone(x))
        if self.kind == "global_1d":  # (B, C, T) -> time mean -> (B, 1, D)
            return self.add_on(f.mean(dim=-1)).unsqueeze(1)
        if self.kind == "global_2d":  # (B, C, 12, T) -> time mean -> (B, D, 12) -> (B, 1, D*12)
            return self.add_on(f.mean(dim=-1)).flatten(1).unsqueeze(1)
        if self.lead_embedding is not None:
            f = f + self.lead_embedding
        z = self.add_on(f)  # (B, D, 12, T)
        if self.row_latent:  # (B, D, 12, T) -> time mean -> rows of window_leads leads -> (B, R', D * leads)
            r = z.mean(dim=-1).unfold(2, self.window_leads, 1)  # (B, D, R', leads)
            return r.permute(0, 2, 1, 3).flatten(2)
        w = z.unfold(2, self.window_leads, 1).unfold(3, self.window, 1)  # (B, D, R', T', leads, window)
        b, d, rows, cols, nl, win = w.shape
        return w.permute(0, 2, 3, 1, 4, 5).reshape(b, rows * cols, d * nl * win)  # index = row * T' + col

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 12, n) -> logits (B, C), pooled similarities (B, P)."""
        sims = self.prototypes.pool(self.prototypes.similarity_map(self.latent_windows(x)))
        return self.head(sims), sims

    def extent(self, window_index: int) -> WindowExtent:
        """Map a window index to the input samples and leads its receptive field covers."""
        if self.kind != "local_2d":
            return WindowExtent(0, self.n_samples, LEADS)
        row, col = divmod(int(window_index), self.window_grid[1])
        start, end = (0, self.n_samples) if self.row_latent else \
            self.backbone.time_field.samples(col, self.window, self.n_samples)
        assert isinstance(self.backbone, Backbone2D)
        seen = {lead for r in range(row, row + self.window_leads) for lead in self.backbone.leads_seen(r)}
        leads = tuple(lead for lead in (c.lstrip("-") for c in CABRERA) if lead in seen)  # Cabrera order
        return WindowExtent(start, end, leads, row, None if self.row_latent else col)
