"""The whole interpretable model: three branches and the fusion head over their prototypes.

`forward` returns label probabilities (what the registered MLflow model serves); `explain` gives
the evidence behind them. The model carries its prototypes' provenance and source records, so a
registered model alone is enough to render an explanation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ecgproto.data.labels import BRANCHES, LabelSet
from ecgproto.model.branch import Branch
from ecgproto.model.config import ModelConfig
from ecgproto.model.fusion import Fusion, FusionHeads

EPS = 1e-6


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy in bits of Bernoulli(p)."""
    q = p.clamp(EPS, 1 - EPS)
    return -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))


def build_branch(name: str, cfg: ModelConfig, labels: LabelSet) -> Branch:
    classes = tuple(labels.codes[i] for i in labels.branch_indices(name))
    return Branch(name, cfg.branches[name], classes, cfg.n_leads, cfg.n_samples, cfg.fs)


class ECGProtoNet(nn.Module):
    def __init__(self, cfg: ModelConfig, labels: LabelSet) -> None:
        super().__init__()
        self.config = cfg.model_dump()
        self.codes = labels.codes
        self.fs = cfg.fs
        self.branches = nn.ModuleDict({name: build_branch(name, cfg, labels) for name in BRANCHES})
        label_of, scales = [], []
        for name, branch in self.branches.items():
            idx = torch.as_tensor(labels.branch_indices(name))
            label_of.append(idx[branch.prototype_class])
            scales.append(torch.full((branch.n_prototypes,), branch.scale))
        self.register_buffer("prototype_label", torch.cat(label_of))
        self.fusion = Fusion(self.prototype_label, torch.cat(scales), len(labels), cfg.fusion)
        self.register_buffer("thresholds", torch.full((len(labels),), 0.5))
        # uncertainty (see `uncertainty`): bootstrap fusion heads, the temperature fitted on the validation fold,
        # and the validation fold's record uncertainties at each percentile 0..100 (NaN until fitted)
        heads = cfg.fusion.heads
        self.fusion_heads = FusionHeads(self.prototype_label, len(labels), heads) if heads else None
        self.register_buffer("temperature", torch.ones(()))
        # added to each label's logit before the temperature: minus the log of the positive-class weight the
        # training's BCE used (a weighted BCE's optimum is the true log-odds plus log w)
        self.register_buffer("logit_offset", torch.zeros(len(labels)))
        self.register_buffer("uncertainty_quantiles", torch.full((101,), float("nan")))
        # Filled by projection: one dict per prototype, and the source records (float16, mV).
        self.provenance: list[dict[str, Any]] = []
        self.register_buffer("source_signals", torch.zeros(0, cfg.n_leads, cfg.n_samples, dtype=torch.float16))

    @property
    def n_prototypes(self) -> int:
        return int(self.prototype_label.numel())

    def similarities(self, x: torch.Tensor, beats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 12, n) -> (B, 1037) pooled similarities of every prototype, branches in BRANCHES order. `beats`
        (B, K) R-peak positions, -1 padded (as a store holds them); found here when not given."""
        if beats is None and any(b.beat for b in self.branches.values()):
            beats = next(b for b in self.branches.values() if b.beat).detect(x)
        return torch.cat([branch(x, beats)[1] for branch in self.branches.values()], dim=1)

    def forward(self, x: torch.Tensor, beats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 12, n) float32 mV, LEADS order, model rate -> (B, 71) label probabilities."""
        return torch.sigmoid(self.fusion(self.similarities(x, beats)))

    @property
    def calibrated(self) -> bool:
        """Whether training fitted the calibration and the validation reference `uncertainty` places records
        among (models saved before ecgproto fitted them have neither)."""
        return bool(torch.isfinite(self.uncertainty_quantiles).all())

    @torch.no_grad()
    def uncertainty(self, sims: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, P) pooled similarities -> the calibrated prediction and how certain it is:

        - probability (B, L): the main head's, calibrated: its logit plus `logit_offset`, over the temperature
          (each label's ranking is that of `forward`);
        - low, high (B, L): the lowest and highest calibrated probability among the main and bootstrap heads;
        - spread (B, L): their standard deviation;
        - uncertainty (B,): the record's total uncertainty, the mean over labels of the binary entropy (bits) of
          the heads' mean probability; epistemic (B,): its part due to the heads' disagreement (mean entropy of
          the mean minus mean of the entropies, the ensemble's mutual information);
        - percentile (B,): where `uncertainty` falls among the validation fold's records (0-100; NaN before the
          fit), so "more uncertain than 95% of the validation ECGs" reads the same for every model.
        Without bootstrap heads, low = high = probability and the uncertainty is the entropy alone."""
        t, offset = self.temperature, self.logit_offset
        probability = torch.sigmoid((self.fusion(sims) + offset) / t)
        members = probability.unsqueeze(0)
        if self.fusion_heads is not None:
            heads = torch.sigmoid((self.fusion_heads(self.fusion.normalised(sims)) + offset) / t)
            members = torch.cat([members, heads], dim=0)  # (K + 1, B, L)
        mean = members.mean(dim=0)
        total = binary_entropy(mean).mean(dim=1)
        epistemic = total - binary_entropy(members).mean(dim=0).mean(dim=1)
        percentile = (
            torch.searchsorted(self.uncertainty_quantiles.contiguous(), total.contiguous()).float().clamp(max=100)
            if self.calibrated
            else torch.full_like(total, float("nan"))
        )
        return {
            "probability": probability,
            "low": members.amin(dim=0),
            "high": members.amax(dim=0),
            "spread": members.std(dim=0, unbiased=False),
            "uncertainty": total,
            "epistemic": epistemic.clamp(min=0),
            "percentile": percentile,
        }

    @property
    def distinct(self) -> torch.Tensor:
        """(P,) bool over all prototypes: a case of its own (not merged into a near-duplicate)."""
        return torch.cat([b.distinct for b in self.branches.values()])

    def membership(self) -> torch.Tensor:
        """(L, P): which labels each prototype belongs to (its class, and after merging near-duplicates the classes
        of those merged into it; none for a merged one): the fusion's own-class mask."""
        own = torch.zeros(len(self.codes), self.n_prototypes)
        offsets = self.prototype_offsets()
        for name, branch in self.branches.items():
            idx = torch.as_tensor([self.codes.index(c) for c in branch.classes])
            at = offsets[name]
            own[idx, at : at + branch.n_prototypes] = branch.class_identity().T.cpu()
        return own

    @torch.no_grad()
    def adopt_merges(self) -> None:
        """After the branches' near-duplicates were merged (before the fusion trains): the fusion heads' own-class
        masks and initial weights follow the branches' membership."""
        for family in (self.fusion, self.fusion_heads):
            if family is not None:
                family.own.copy_(self.membership().to(family.own))
                family.weight.copy_(family.initial_weight().expand_as(family.weight))

    @torch.no_grad()
    def merge(self, duplicate: int, keeper: int) -> None:
        """Merge prototype `duplicate` into `keeper` (indices over the whole model, same branch) in a trained model:
        the branch head's and every fusion head's weights are summed on the keeper, which also takes the duplicate's
        classes; where the two similarities are equal every output stays the same (see Branch.merge)."""
        offsets = self.prototype_offsets()
        name = next(n for n in reversed(offsets) if offsets[n] <= duplicate)
        branch = self.branches[name]
        if not offsets[name] <= keeper < offsets[name] + branch.n_prototypes:
            raise ValueError(f"prototypes {duplicate} and {keeper} are in different branches")
        branch.merge(duplicate - offsets[name], keeper - offsets[name])
        for family in (self.fusion, self.fusion_heads):
            if family is not None:
                family.weight[..., keeper] += family.weight[..., duplicate]
                family.weight[..., duplicate] = 0
                family.own[:, keeper] = torch.maximum(family.own[:, keeper], family.own[:, duplicate])
                family.own[:, duplicate] = 0
        if self.provenance:
            self.provenance[duplicate]["merged_into"] = keeper

    def prototype_offsets(self) -> dict[str, int]:
        """Where each branch's prototypes start in the concatenated similarity vector."""
        out, at = {}, 0
        for name, branch in self.branches.items():
            out[name] = at
            at += branch.n_prototypes
        return out
