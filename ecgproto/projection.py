"""Push every prototype onto the latent of a real training segment of its class, with provenance.

Each prototype becomes exactly the latent of a real window (the nearest one, ProtoPNet's rule) of a
training record positive for its class; the prototypes of one class come from different records.
Provenance records where that window lies in the raw signal: the samples and leads its receptive
field really sees.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ecgproto.model.branch import Branch
from ecgproto.train.data import SplitData

PROVENANCE_COLUMNS = ("prototype", "branch", "index_in_branch", "class", "ecg_id", "window_start", "window_end",
                      "start_s", "end_s", "leads", "row", "column", "similarity", "source_labels",
                      "own_class_source")


@torch.no_grad()
def project_prototypes(branch: Branch, train: SplitData, label_index: np.ndarray, codes: tuple[str, ...],
                       fs: float, batch_size: int = 128, device: torch.device | None = None,
                       offset: int = 0) -> pd.DataFrame:
    """Replace `branch`'s prototypes in place; return one provenance row per prototype.

    The prototypes of one class come from different training ECGs: each keeps its `per_class` best
    candidate records (best window per record), then the class's prototypes, best match first,
    each take their best record not already taken (plain nearest-window projection lets several
    prototypes land on the same segment: a third of the demo's local prototypes did).

    A prototype whose class has no positive training record (possible in small cohorts) is pushed
    onto the best-matching window of any training record and flagged `own_class_source=False`.
    """
    device = device or torch.device("cpu")
    branch.eval().to(device)
    p = branch.n_prototypes
    cls = branch.prototype_class.cpu().numpy()
    k = int(np.bincount(cls).max())  # candidates per prototype: enough for every prototype of its class
    has_pos = train.labels[:, label_index].any(axis=0)[cls]  # (P,) class has a positive record
    # Per prototype its k best candidates (one window per record), kept on the device.
    best = {own: _Candidates(p, k, branch.prototype_dim, device) for own in (True, False)}
    cls_t = torch.as_tensor(cls, device=device)
    for batch in train.batches(batch_size):
        windows = branch.latent_windows(batch.x.to(device)).float()  # (B, W, D)
        sim = branch.prototypes.similarity_map(windows) / branch.scale  # cosine (B, W, P)
        eligible = batch.y[:, label_index].to(device)[:, cls_t] > 0  # (B, P)
        value, where = sim.max(dim=1)  # (B, P) each record's best window per prototype
        records = torch.as_tensor(batch.index, device=device)
        for own in (True, False):
            best[own].add(value.masked_fill(~eligible, -np.inf) if own else value, where, records, windows)
    chosen = {own: best[own].assign(cls) for own in (True, False)}  # (P,) candidate slot per prototype
    use_own = torch.as_tensor(has_pos, device=device)

    def pick(own: bool, name: str) -> torch.Tensor:
        c = best[own]
        slot = torch.as_tensor(chosen[own], device=device)
        return getattr(c, name)[torch.arange(p, device=device), slot]

    sims = torch.where(use_own, pick(True, "value"), pick(False, "value")).cpu()
    latents = torch.where(use_own.unsqueeze(1), pick(True, "latent"), pick(False, "latent"))
    records = torch.where(use_own, pick(True, "record"), pick(False, "record")).cpu().numpy()
    windows_at = torch.where(use_own, pick(True, "window"), pick(False, "window")).cpu().numpy()
    branch.prototypes.prototypes.data.copy_(latents.to(branch.prototypes.prototypes.device))

    rows = []
    for j in range(p):
        ext = branch.extent(int(windows_at[j]))
        rec = int(records[j])
        labels = [codes[i] for i in np.flatnonzero(train.labels[rec])]
        rows.append({"prototype": offset + j, "branch": branch.name, "index_in_branch": j,
                     "class": branch.classes[cls[j]], "ecg_id": str(train.record_ids[rec]),
                     "window_start": ext.start, "window_end": ext.end, "start_s": ext.start / fs, "end_s": ext.end / fs,
                     "leads": ",".join(ext.leads), "row": -1 if ext.row is None else ext.row,
                     "column": -1 if ext.column is None else ext.column, "window": int(windows_at[j]),
                     "similarity": float(sims[j]), "source_labels": ",".join(labels),
                     "own_class_source": bool(has_pos[j]), "split_position": rec})
    return pd.DataFrame(rows)


class _Candidates:
    """Each prototype's k best (record, window) candidates so far, at most one per record."""

    def __init__(self, p: int, k: int, dim: int, device: torch.device) -> None:
        self.k = k
        self.value = torch.full((p, k), -np.inf, device=device)
        self.latent = torch.zeros(p, k, dim, device=device)
        self.record = torch.full((p, k), -1, dtype=torch.long, device=device)
        self.window = torch.zeros(p, k, dtype=torch.long, device=device)

    def add(self, value: torch.Tensor, where: torch.Tensor, records: torch.Tensor, windows: torch.Tensor) -> None:
        """value, where (B, P): each record's best cosine and window; records (B,); windows (B, W, D)."""
        b = value.shape[0]
        top, idx = torch.cat([self.value, value.T], dim=1).topk(self.k, dim=1)  # (P, k); batches see new records
        new = idx >= self.k
        slot = idx.clamp(max=self.k - 1)
        rec = (idx - self.k).clamp(0, b - 1)  # (P, k) row of the batch, where new
        win = where.T.gather(1, rec)  # (P, k)
        self.latent = torch.where(new[..., None], windows[rec, win], self.latent.gather(
            1, slot[..., None].expand(-1, -1, self.latent.shape[2])))
        self.record = torch.where(new, records[rec], self.record.gather(1, slot))
        self.window = torch.where(new, win, self.window.gather(1, slot))
        self.value = top

    def assign(self, cls: np.ndarray) -> np.ndarray:
        """(P,) the candidate slot each prototype takes: per class, best match first, a record not yet taken."""
        value, record = self.value.cpu().numpy(), self.record.cpu().numpy()
        slot = np.zeros(len(cls), dtype=int)
        for c in np.unique(cls):
            members = np.flatnonzero(cls == c)
            taken: set[int] = set()
            for j in members[np.argsort(-value[members, 0], kind="stable")]:
                free = [s for s in range(self.k) if record[j, s] not in taken and np.isfinite(value[j, s])]
                slot[j] = free[0] if free else 0  # fewer eligible records than prototypes: share the best
                taken.add(int(record[j, slot[j]]))
        return slot
