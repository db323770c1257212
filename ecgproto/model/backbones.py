"""ResNet-18-style backbones: `Backbone1D` over the 12 leads as channels, `Backbone2D` over a
(lead x time) image that keeps the lead axis, so a feature column still belongs to a lead.

The 2D net reorders the leads to the Cabrera sequence (aVL, I, -aVR, II, aVF, III, V1..V6), where
neighbours are anatomically adjacent; its early stages convolve each lead alone (kernel 1 on the
lead axis) and only the last `lead_mixing_stages` stages mix a lead with its two neighbours.
Each backbone reports its exact receptive field so a prototype's window maps to the raw samples
(and leads) it really sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecgproto.data.leads import LEADS
from ecgproto.model.config import BackboneConfig

CABRERA: tuple[str, ...] = ("aVL", "I", "-aVR", "II", "aVF", "III", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclass(frozen=True)
class ReceptiveField:
    """Feature column t sees input samples [first + t*jump, first + t*jump + size), clipped to the record."""

    first: int
    jump: int
    size: int

    def then(self, kernel: int, stride: int, padding: int) -> ReceptiveField:
        return ReceptiveField(
            self.first - padding * self.jump, self.jump * stride, self.size + (kernel - 1) * self.jump
        )

    def samples(self, start_col: int, n_cols: int, n_samples: int) -> tuple[int, int]:
        lo = self.first + start_col * self.jump
        hi = self.first + (start_col + n_cols - 1) * self.jump + self.size
        return max(lo, 0), min(hi, n_samples)


class BasicBlock(nn.Module):
    """Two 3-wide convolutions with a residual; `lead_kernel` 3 mixes neighbouring leads in the first."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int, lead_kernel: int = 1) -> None:
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)

        def k(lead: int, time: int) -> int | tuple[int, int]:
            return time if dims == 1 else (lead, time)

        self.conv1 = conv(c_in, c_out, k(lead_kernel, 3), k(1, stride), k(lead_kernel // 2, 1), bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, k(1, 3), 1, k(0, 1), bias=False)
        self.bn2 = bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, k(1, stride), bias=False), bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stages(dims: int, cfg: BackboneConfig, c_in: int, mixing_from: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for s, (width, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
        for b in range(n_blocks):
            stride = 2 if s > 0 and b == 0 else 1
            lead_kernel = 3 if dims == 2 and s >= mixing_from else 1
            layers.append(BasicBlock(dims, c_in, width, stride, lead_kernel))
            c_in = width
    return nn.Sequential(*layers)


def _time_field(cfg: BackboneConfig) -> ReceptiveField:
    rf = ReceptiveField(0, 1, 1).then(cfg.stem_kernel, 2, cfg.stem_kernel // 2).then(3, 2, 1)  # stem conv, max-pool
    for s, n_blocks in enumerate(cfg.blocks):
        for b in range(n_blocks):
            rf = rf.then(3, 2 if s > 0 and b == 0 else 1, 1).then(3, 1, 1)
    return rf


class Backbone1D(nn.Module):
    """(B, 12, n) -> (B, C, n/32): the rhythm branch's 1D ResNet."""

    def __init__(self, cfg: BackboneConfig, n_leads: int = 12) -> None:
        super().__init__()
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(
            nn.Conv1d(n_leads, w0, cfg.stem_kernel, 2, cfg.stem_kernel // 2, bias=False),
            nn.BatchNorm1d(w0),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(3, 2, 1),
        )
        self.stages = _stages(1, cfg, w0, mixing_from=4)
        self.out_channels = cfg.widths[-1]
        self.time_field = _time_field(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class Backbone2D(nn.Module):
    """(B, 12, n) in LEADS order -> (B, C, 12, n/32) with rows in CABRERA order."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        w0 = cfg.widths[0]
        order = [LEADS.index(name.lstrip("-")) for name in CABRERA]
        sign = [-1.0 if name.startswith("-") else 1.0 for name in CABRERA]
        self.register_buffer("lead_order", torch.tensor(order), persistent=False)
        self.register_buffer("lead_sign", torch.tensor(sign).view(1, -1, 1), persistent=False)
        k = cfg.stem_kernel
        self.stem = nn.Sequential(
            nn.Conv2d(1, w0, (1, k), (1, 2), (0, k // 2), bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((1, 3), (1, 2), (0, 1)),
        )
        mixing_from = len(cfg.widths) - cfg.lead_mixing_stages
        self.stages = _stages(2, cfg, w0, mixing_from=mixing_from)
        self.out_channels = cfg.widths[-1]
        self.time_field = _time_field(cfg)
        # Each block of a mixing stage widens the lead field by one neighbour on each side.
        self.lead_reach = sum(n for s, n in enumerate(cfg.blocks) if s >= mixing_from)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x[:, self.lead_order] * self.lead_sign).unsqueeze(1)  # (B, 1, 12, n)
        return self.stages(self.stem(x))

    def leads_seen(self, row: int) -> tuple[str, ...]:
        """Input leads (project names) that a feature row sees."""
        lo, hi = max(row - self.lead_reach, 0), min(row + self.lead_reach, len(CABRERA) - 1)
        return tuple(CABRERA[r].lstrip("-") for r in range(lo, hi + 1))
