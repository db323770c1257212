"""A branch: backbone -> add-on layers -> prototype similarities -> class-connected head.

global_1d  rhythm: 1D ResNet, time-averaged (shift-invariant) latent (D,), one window
local_2d   local morphology: 2D ResNet, windows of `window` feature columns on one lead row;
           with pool="beat" beat windows instead: each detected beat (P-QRS-T around its R peak) is
           cropped, encoded per lead, and its latent taken per lead group (e.g. II, aVF, III); the
           latents are averaged over the record's beats (a morphology recurs in every beat) and
           each prototype is compared with its own lead group only. Projection makes a prototype
           one real beat of one training ECG in those leads.
global_2d  global: 2D ResNet, time-averaged latent per lead row (D x 12): phase-invariant
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecgproto.data.beats import detect_batch
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
    column: int | None = None  # beat pooling: the beat's slot among the record's beats


class GroupedLeads(nn.Module):
    """(B, C, 12, T) -> (B, D, 12 / size + 1, T): one latent per non-overlapping group of `size` lead rows (a kernel
    as tall as the group, its stride the same), then one that reads all 12 leads at once (findings spread over
    the groups: the axis, voltage summed over limb and chest leads)."""

    def __init__(self, c: int, d: int, size: int, n_leads: int = 12) -> None:
        super().__init__()
        self.groups = nn.Conv2d(c, d, (size, 1), (size, 1))
        self.whole = nn.Conv2d(c, d, (n_leads, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.groups(f), self.whole(f)], dim=2)


class Branch(nn.Module):
    def __init__(
        self,
        name: str,
        cfg: BranchConfig,
        classes: tuple[str, ...],
        n_leads: int = 12,
        n_samples: int = 1000,
        fs: float = 100.0,
    ) -> None:
        super().__init__()
        self.name, self.kind, self.classes, self.n_samples, self.fs = name, cfg.kind, tuple(classes), n_samples, fs
        self.beat = cfg.pool == "beat"  # local_2d only (BranchConfig checks)
        self.window = cfg.window if cfg.kind == "local_2d" and not self.beat else 1
        self.window_leads = cfg.window_leads if cfg.kind == "local_2d" else 1
        self.whole_group = self.beat and cfg.whole_beat_group
        # beat windows: samples before / after the R peak, beats per record (evaluation / joint stage), jitter
        self.beat_pre, self.beat_post = (int(round(t * fs)) for t in cfg.beat_window_s)
        self.n_beats, self.train_beats = cfg.beats, cfg.train_beats
        self.beat_jitter = int(round(cfg.beat_jitter_s * fs))
        self.backbone: Backbone1D | Backbone2D = (
            Backbone1D(cfg.backbone, n_leads) if cfg.kind == "global_1d" else Backbone2D(cfg.backbone)
        )
        # feature columns of one record, or of one beat window (no RNG drawn)
        self._time_columns = self._columns(n_leads, self.beat_length if self.beat else n_samples)
        c, d = self.backbone.out_channels, cfg.latent_dim
        conv = {"global_1d": nn.Linear, "local_2d": nn.Conv2d, "global_2d": nn.Conv1d}[cfg.kind]

        def pointwise(a: int, b: int) -> nn.Module:
            return conv(a, b) if conv is nn.Linear else conv(a, b, 1)

        self.dropout = nn.Dropout(cfg.dropout)
        # local_2d: the per-lead convolutions share weights across leads, so without this a window in V1
        # and the same shape in V5 would be the same latent (an inverted T is normal in V1, not in V5).
        # A learned per-lead offset makes every local latent, and so every prototype, lead-aware.
        self.lead_embedding = (
            nn.Parameter(torch.zeros(1, c, len(CABRERA), 1)) if cfg.kind == "local_2d" and cfg.lead_embedding else None
        )
        norm = {"global_1d": nn.BatchNorm1d, "local_2d": nn.BatchNorm2d, "global_2d": nn.BatchNorm1d}[cfg.kind]
        last = norm(d, affine=False)  # standardised latents: zero-mean, unit-variance, cosines across [-1, 1]
        # beat pooling: the first add-on layer reads a whole lead group (kernel = stride = its height), so a group's
        # latent combines its leads while groups stay apart
        first = (
            (
                GroupedLeads(c, d, self.window_leads)
                if self.whole_group
                else nn.Conv2d(c, d, (self.window_leads, 1), (self.window_leads, 1))
            )
            if self.beat
            else pointwise(c, d)
        )
        self.add_on = nn.Sequential(first, nn.ReLU(), pointwise(d, d), last)
        n_rows = len(CABRERA) if cfg.kind == "global_2d" else 1
        per_class = cfg.prototypes_per_class
        self.prototype_dim = d * self._time_columns if self.beat else d * self.window * self.window_leads * n_rows
        n_groups = self.window_grid[0]
        # beat pooling: a class's prototypes take the lead groups in turn (as many as groups: one in each)
        group = torch.arange(per_class).repeat(len(classes)) % n_groups if self.beat else None
        self.prototypes = PrototypeLayer(
            per_class * len(classes),
            self.prototype_dim,
            cfg.scale,
            cfg.pool,
            rows=n_groups,
            similarity=cfg.similarity,
            group=group,
        )
        self.register_buffer("prototype_class", torch.arange(len(classes)).repeat_interleave(per_class))
        # after projection, near-duplicate prototypes are merged (ecgproto.train.projection.merge_near_duplicates): each
        # prototype's keeper, itself while it is a distinct case; a merged one scores 0 and its weights are the
        # keeper's, which then also belongs to the merged one's class
        self.register_buffer("merged_into", torch.arange(per_class * len(classes)))
        self.head = nn.Linear(per_class * len(classes), len(classes), bias=False)
        self.reset_head(cfg.head_negative)

    @property
    def n_prototypes(self) -> int:
        return int(self.prototype_class.numel())

    @property
    def distinct(self) -> torch.Tensor:
        """(P,) bool: the prototypes that are cases of their own (not merged into another)."""
        return self.merged_into == torch.arange(self.n_prototypes, device=self.merged_into.device)

    @property
    def window_grid(self) -> tuple[int, int]:
        """(lead rows, time columns) of one record's latent windows, window index = row * columns + column;
        (1, 1) for the global branches (one whole-record latent)."""
        if self.kind != "local_2d":
            return 1, 1
        if self.beat:  # one pooled latent per lead group (and one of all leads)
            return len(CABRERA) // self.window_leads + int(self.whole_group), 1
        rows = len(CABRERA) - self.window_leads + 1
        return rows, self._time_columns - self.window + 1

    @property
    def beat_length(self) -> int:
        """Samples of one beat window."""
        return self.beat_pre + self.beat_post

    @property
    def n_windows(self) -> int:
        rows, cols = self.window_grid
        return rows * cols

    @property
    def scale(self) -> float:
        return self.prototypes.scale

    def class_identity(self) -> torch.Tensor:
        """(P, C): which classes each prototype belongs to. One-hot until near-duplicates are merged; then a keeper
        also belongs to the classes of the prototypes merged into it, and a merged prototype to none."""
        own = nn.functional.one_hot(self.prototype_class, len(self.classes)).float()
        return torch.zeros_like(own).index_add_(0, self.merged_into, own).clamp(max=1)

    @torch.no_grad()
    def merge(self, duplicate: int, keeper: int) -> None:
        """Merge prototype `duplicate` into `keeper` (a distinct one): the head's weights of the two are summed on the
        keeper, so where their similarities are equal every logit stays the same, and the duplicate scores 0 from
        now on."""
        if duplicate == keeper or not (bool(self.distinct[keeper]) and bool(self.distinct[duplicate])):
            raise ValueError(f"merging {duplicate} into {keeper}: both must be distinct prototypes, and two")
        self.head.weight[:, keeper] += self.head.weight[:, duplicate]
        self.head.weight[:, duplicate] = 0
        self.merged_into[self.merged_into == duplicate] = keeper

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

    def latent_windows(self, x: torch.Tensor, beats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 12, n) -> (B, W, D') latent windows the prototypes are compared with. `beats` (B, K) R-peak
        positions, -1 padded, for beat pooling (detected here when not given)."""
        if self.beat:  # (B, M, G, D') per beat -> mean over the record's beats -> (B, G, D')
            return self.beat_latents(x, beats)[0].mean(dim=1)
        f = self.dropout(self.backbone(x))
        if self.kind == "global_1d":  # (B, C, T) -> time mean -> (B, 1, D)
            return self.add_on(f.mean(dim=-1)).unsqueeze(1)
        if self.kind == "global_2d":  # (B, C, 12, T) -> time mean -> (B, D, 12) -> (B, 1, D*12)
            return self.add_on(f.mean(dim=-1)).flatten(1).unsqueeze(1)
        if self.lead_embedding is not None:
            f = f + self.lead_embedding
        z = self.add_on(f)  # (B, D, 12, T)
        w = z.unfold(2, self.window_leads, 1).unfold(3, self.window, 1)  # (B, D, R', T', leads, window)
        b, d, rows, cols, nl, win = w.shape
        return w.permute(0, 2, 3, 1, 4, 5).reshape(b, rows * cols, d * nl * win)  # index = row * T' + col

    def beat_latents(self, x: torch.Tensor, beats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Beat pooling: (B, 12, n) -> latents (B, M, G, D') of M beat windows per record in each lead group,
        and the windows' R-peak positions (B, M). In training a random subset of `train_beats` beats, jittered;
        in evaluation `beats` evenly spaced ones."""
        if beats is None:
            beats = self.detect(x)
        pos = self.select_beats(beats.to(x.device), x.shape[-1])  # (B, M)
        b, m = pos.shape
        t = pos.unsqueeze(-1) + torch.arange(-self.beat_pre, self.beat_post, device=x.device)  # (B, M, L)
        t = t.clamp(0, x.shape[-1] - 1)  # only records shorter than one window reach past their ends
        crops = x.transpose(1, 2)[torch.arange(b, device=x.device).view(b, 1, 1), t]  # (B, M, L, 12)
        f = self.dropout(self.backbone(crops.permute(0, 1, 3, 2).flatten(0, 1)))  # (B*M, C, 12, T')
        if self.lead_embedding is not None:
            f = f + self.lead_embedding
        z = self.add_on(f)  # (B*M, D, G, T')
        z = z.permute(0, 2, 1, 3).flatten(2)  # (B*M, G, D*T')
        return z.view(b, m, *z.shape[1:]), pos

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 12, n) -> (B, K) beat positions found by ecgproto.data.beats (for records given without them)."""
        found, _ = detect_batch(x.detach().float().cpu().numpy(), self.fs)
        return torch.as_tensor(found, dtype=torch.long, device=x.device)

    def select_beats(self, beats: torch.Tensor, n: int) -> torch.Tensor:
        """(B, K) positions, -1 padded -> (B, M) positions of whole beat windows: evenly spaced over the record
        (evaluation) or a random subset, jittered (training); a record with fewer beats repeats them evenly, one
        with none (a window longer than the record) gets evenly spaced windows."""
        m = self.train_beats if self.training else self.n_beats
        beats = beats.long()
        lo, hi = self.beat_pre, n - self.beat_post
        valid = (beats >= lo) & (beats <= hi)
        count = valid.sum(dim=1, keepdim=True)  # (B, 1)
        key = torch.rand(beats.shape, device=beats.device) if self.training else beats.float()
        order = key.masked_fill(~valid, float("inf")).argsort(dim=1)  # valid beats first
        slot = ((torch.arange(m, device=beats.device) + 0.5) * count / m).long().clamp(max=beats.shape[1] - 1)
        pos = beats.gather(1, order.gather(1, slot))  # (B, M)
        grid = torch.linspace(lo, max(hi, lo), m, device=beats.device).round().long()
        pos = torch.where(count > 0, pos, grid.clamp(max=max(n - 1, 0)))
        if self.training and self.beat_jitter:
            pos = pos + torch.randint(-self.beat_jitter, self.beat_jitter + 1, pos.shape, device=pos.device)
            pos = pos.clamp(lo, max(hi, lo))
        return pos

    def forward(self, x: torch.Tensor, beats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 12, n) -> logits (B, C), pooled similarities (B, P)."""
        sims = self.prototypes.pool(self.prototypes.similarity_map(self.latent_windows(x, beats)))
        sims = sims * self.distinct.to(sims.dtype)  # merged prototypes are no evidence of their own
        return self.head(sims), sims

    def group_leads(self, group: int) -> tuple[str, ...]:
        """Beat pooling: the input leads of lead group `group` (Cabrera order)."""
        assert isinstance(self.backbone, Backbone2D)
        n = len(CABRERA) // self.window_leads
        rows = range(len(CABRERA)) if group == n else range(group * self.window_leads, (group + 1) * self.window_leads)
        seen = {lead for r in rows for lead in self.backbone.leads_seen(r)}
        return tuple(lead for lead in (c.lstrip("-") for c in CABRERA) if lead in seen)

    def extent(self, window_index: int, beat_position: int | None = None) -> WindowExtent:
        """Map a window index to the input samples and leads its receptive field covers. Beat pooling: the window
        index is the lead group (in a record's pooled latents) or beat slot * groups + group (in its per-beat
        latents, see `beat_windows`), and `beat_position` the beat's R peak."""
        if self.kind != "local_2d":
            return WindowExtent(0, self.n_samples, LEADS)
        if self.beat:
            slot, group = divmod(int(window_index), self.window_grid[0])
            if beat_position is None:
                raise ValueError("a beat window's extent needs the beat's position")
            start = max(int(beat_position) - self.beat_pre, 0)
            return WindowExtent(
                start, min(int(beat_position) + self.beat_post, self.n_samples), self.group_leads(group), group, slot
            )
        row, col = divmod(int(window_index), self.window_grid[1])
        start, end = self.backbone.time_field.samples(col, self.window, self.n_samples)
        assert isinstance(self.backbone, Backbone2D)
        seen = {lead for r in range(row, row + self.window_leads) for lead in self.backbone.leads_seen(r)}
        leads = tuple(lead for lead in (c.lstrip("-") for c in CABRERA) if lead in seen)  # Cabrera order
        return WindowExtent(start, end, leads, row, col)

    def candidate_windows(
        self, x: torch.Tensor, beats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What a prototype may be projected onto: (B, W, D') real windows, which prototypes may take each
        window ((W, P) bool, None: all), and each window's beat position ((B, W), None: not beats). Beat pooling:
        single beats (not a record's mean over beats), window index = beat slot * groups + group, a prototype
        only windows of its own lead group."""
        if not self.beat:
            return self.latent_windows(x, beats), None, None
        z, pos = self.beat_latents(x, beats)  # (B, M, G, D'), (B, M)
        b, m, g, d = z.shape
        group = torch.arange(g, device=z.device).repeat(m)  # (W,)
        allowed = group[:, None] == self.prototypes.group[None, :].to(z.device)  # (W, P)
        return z.reshape(b, m * g, d), allowed, pos.repeat_interleave(g, dim=1)
