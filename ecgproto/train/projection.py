"""Push every prototype onto the latent of a real training segment of its class, with provenance.

Each prototype becomes exactly the latent of a real window of a training record positive for its
class; the prototypes of one class come from different records. Provenance records where that
window lies in the raw signal: the samples and leads its receptive field really sees, and how
faithfully the real window reproduces the trained prototype (`fidelity`).

Which window: under max pooling over many windows the nearest one (ProtoPNet's rule: the best
window's similarity is what the model used, and the nearest real window keeps it). Under a pooling
that averages windows (lead_mean) the nearest window is a poor stand-in: the
trained prototype is a direction that matches a whole lead strip on average, and no single window
lies near it (on the real PTB-XL subset the nearest window's cosine is ~0.2). There, among each
prototype's nearest candidate windows, the one whose pooled similarities over the training records
correlate best with the trained prototype's is taken (local-branch macro-AUROC after projection,
real subset, joint head: nearest 0.772, this 0.785, before projection 0.802). The same holds with one
window per record (the global branches: the nearest whole-record latent is still far, and what the
head uses is how the similarity ranks the records; rhythm-branch macro-AUROC after projection, real
subset, joint head, mean over 7 trained checkpoints: val/test +0.027/+0.021 over the nearest, up to
+0.09, never worse by more than 0.013). Under
beat pooling the candidates are single beats of the prototype's own lead group (never a record's mean
over beats), so a projected prototype is one real P-QRS-T in named leads, taken by fidelity as well.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ecgproto.model.branch import Branch
from ecgproto.model.names import prototype_name
from ecgproto.train.data import SplitData
from ecgproto.train.quality import prototype_cosines

PROVENANCE_COLUMNS = (
    "prototype",
    "name",
    "branch",
    "index_in_branch",
    "class",
    "ecg_id",
    "window_start",
    "window_end",
    "start_s",
    "end_s",
    "leads",
    "row",
    "column",
    "similarity",
    "fidelity",
    "source_labels",
    "own_class_source",
    "beat_source",
    "merged_into",
)


@torch.no_grad()
def project_prototypes(
    branch: Branch,
    train: SplitData,
    label_index: np.ndarray,
    codes: tuple[str, ...],
    fs: float,
    batch_size: int = 128,
    device: torch.device | None = None,
    offset: int = 0,
    candidates: int = 16,
    fidelity_records: int = 1024,
    seed: int = 0,
) -> pd.DataFrame:
    """Replace `branch`'s prototypes in place; return one provenance row per prototype.

    Each prototype keeps its `candidates` (at least as many as its class has prototypes) nearest
    candidate records (best window per record). Each candidate's fidelity is the Pearson correlation,
    over `fidelity_records` training records (all of them, or a seeded sample), of its pooled
    similarities with the trained prototype's. The class's prototypes then, best first, each take
    their best candidate (nearest under max pooling over many windows, most faithful otherwise) whose
    record is not already taken: the prototypes of one class come from different training ECGs (plain
    nearest-window projection let a third of the demo's local prototypes share a segment).

    A prototype whose class has no positive training record (possible in small cohorts) is pushed
    onto the best-matching window of any training record and flagged `own_class_source=False`.
    """
    device = device or torch.device("cpu")
    branch.eval().to(device)
    p = branch.n_prototypes
    cls = branch.prototype_class.cpu().numpy()
    k = max(int(np.bincount(cls).max()), candidates)  # enough for every prototype of its class
    has_pos = train.labels[:, label_index].any(axis=0)[cls]  # (P,) class has a positive record
    use_own = torch.as_tensor(has_pos, device=device)
    # Per prototype its k best candidates (one window per record), kept on the device.
    best = _Candidates(p, k, branch.prototype_dim, device)
    cls_t = torch.as_tensor(cls, device=device)
    for batch in train.batches(batch_size):
        windows, allowed, beat_at = branch.candidate_windows(batch.x.to(device), batch.beats.to(device))
        windows = windows.float()  # (B, W, D)
        sim = branch.prototypes.cosine_map(windows)  # (B, W, P); similarity increases with it
        if allowed is not None:  # beat windows: a prototype takes a beat of its own lead group only
            sim = sim.masked_fill(~allowed, -np.inf)
        # records positive for the prototype's class; any record where the class has none
        eligible = (batch.y[:, label_index].to(device)[:, cls_t] > 0) | ~use_own  # (B, P)
        value, where = sim.max(dim=1)  # (B, P) each record's best window per prototype
        position = None if beat_at is None else beat_at.gather(1, where)  # (B, P) that window's beat
        best.add(
            value.masked_fill(~eligible, -np.inf), where, torch.as_tensor(batch.index, device=device), windows, position
        )
    # an averaging pool, row latents, or one window per record: the nearest window is not the best stand-in
    faithful = branch.prototypes.pool_mode != "max" or branch.n_windows == 1
    if faithful:  # every candidate's fidelity ranks the candidates
        fidelity = _fidelity(branch, train, best.latent, batch_size, device, fidelity_records, seed)  # (P, k)
        slot = best.assign(cls, fidelity)  # (P,) the candidate each prototype takes
    else:  # nearest first; only the windows taken need their fidelity (for the provenance)
        slot = best.assign(cls)
    take = (torch.arange(p, device=device), torch.as_tensor(slot, device=device))
    sims, records, windows_at, beats_at = (
        t[take].cpu().numpy() for t in (best.value, best.record, best.window, best.position)
    )
    fid = (
        fidelity[np.arange(p), slot]
        if faithful
        else _fidelity(branch, train, best.latent[take].unsqueeze(1), batch_size, device, fidelity_records, seed)[:, 0]
    )
    branch.prototypes.prototypes.data.copy_(best.latent[take].to(branch.prototypes.prototypes.device))

    sources = _beat_sources(train)
    rows = []
    for j in range(p):
        ext = branch.extent(int(windows_at[j]), int(beats_at[j]) if branch.beat else None)
        rec = int(records[j])
        labels = [codes[i] for i in np.flatnonzero(train.labels[rec])]
        rows.append(
            {
                "prototype": offset + j,
                "name": prototype_name(offset + j, branch.classes[cls[j]], branch.name),
                "branch": branch.name,
                "index_in_branch": j,
                "class": branch.classes[cls[j]],
                "ecg_id": str(train.record_ids[rec]),
                "window_start": ext.start,
                "window_end": ext.end,
                "start_s": ext.start / fs,
                "end_s": ext.end / fs,
                "leads": ",".join(ext.leads),
                "row": -1 if ext.row is None else ext.row,
                "column": -1 if ext.column is None else ext.column,
                "window": int(windows_at[j]),
                "similarity": float(sims[j]),
                "fidelity": float(fid[j]),
                "source_labels": ",".join(labels),
                "own_class_source": bool(has_pos[j]),
                "beat_source": sources[rec] if branch.beat else "",
                "split_position": rec,
                "merged_into": offset + j,  # itself: a distinct case (until merge_near_duplicates)
            }
        )
    return pd.DataFrame(rows)


def _beat_sources(train: SplitData) -> np.ndarray:
    """Per training record, how its beats were found ('detected', or 'grid' where detection failed)."""
    m = train.store.manifest.set_index("row")
    if "beat_source" not in m:
        return np.full(len(train), "", dtype=object)
    return m.loc[train.rows, "beat_source"].astype(str).to_numpy()


class _Candidates:
    """Each prototype's k best (record, window) candidates so far, at most one per record."""

    def __init__(self, p: int, k: int, dim: int, device: torch.device) -> None:
        self.k = k
        self.value = torch.full((p, k), -np.inf, device=device)
        self.latent = torch.zeros(p, k, dim, device=device)
        self.record = torch.full((p, k), -1, dtype=torch.long, device=device)
        self.window = torch.zeros(p, k, dtype=torch.long, device=device)
        self.position = torch.full((p, k), -1, dtype=torch.long, device=device)  # beat windows: the beat's R peak

    def add(
        self,
        value: torch.Tensor,
        where: torch.Tensor,
        records: torch.Tensor,
        windows: torch.Tensor,
        position: torch.Tensor | None = None,
    ) -> None:
        """value, where (B, P): each record's best cosine and window; records (B,); windows (B, W, D);
        position (B, P): the beat of that window, where windows are beats."""
        b = value.shape[0]
        top, idx = torch.cat([self.value, value.T], dim=1).topk(self.k, dim=1)  # (P, k); batches see new records
        new = idx >= self.k
        slot = idx.clamp(max=self.k - 1)
        rec = (idx - self.k).clamp(0, b - 1)  # (P, k) row of the batch, where new
        win = where.T.gather(1, rec)  # (P, k)
        self.latent = torch.where(
            new[..., None],
            windows[rec, win],
            self.latent.gather(1, slot[..., None].expand(-1, -1, self.latent.shape[2])),
        )
        self.record = torch.where(new, records[rec], self.record.gather(1, slot))
        self.window = torch.where(new, win, self.window.gather(1, slot))
        if position is not None:
            self.position = torch.where(new, position.T.gather(1, rec), self.position.gather(1, slot))
        self.value = top

    def assign(self, cls: np.ndarray, preference: np.ndarray | None = None) -> np.ndarray:
        """(P,) the candidate slot each prototype takes: per class, best first, a record not yet taken.
        `preference` (P, k), higher is better, ranks the candidates; default: nearest first."""
        value, record = self.value.cpu().numpy(), self.record.cpu().numpy()
        rank = value if preference is None else np.where(np.isfinite(value), preference, -np.inf)
        slot = np.zeros(len(cls), dtype=int)
        for c in np.unique(cls):
            members = np.flatnonzero(cls == c)
            taken: set[int] = set()
            for j in members[np.argsort(-rank[members].max(axis=1), kind="stable")]:
                order = np.argsort(-rank[j], kind="stable")
                free = [s for s in order if record[j, s] not in taken and np.isfinite(rank[j, s])]
                slot[j] = free[0] if free else int(order[0])  # fewer eligible records than prototypes: share the best
                taken.add(int(record[j, slot[j]]))
        return slot


@torch.no_grad()
def _fidelity(
    branch: Branch,
    train: SplitData,
    candidates: torch.Tensor,
    batch_size: int,
    device: torch.device,
    n_records: int,
    seed: int,
) -> np.ndarray:
    """(P, k) Pearson correlation, over training records, of each candidate's pooled similarity with
    its trained prototype's (streamed sums: nothing of size records x candidates is held)."""
    layer = branch.prototypes
    p, k, _ = candidates.shape
    rng = np.random.default_rng(seed)
    index = np.arange(len(train)) if len(train) <= n_records else np.sort(rng.choice(len(train), n_records, False))
    protos = torch.cat([layer.prototypes.detach().to(device).unsqueeze(1), candidates], dim=1)  # (P, 1 + k, D)
    # beat pooling: every candidate is compared with its prototype's lead group
    group = layer.group.to(device).repeat_interleave(1 + k) if layer.pool_mode == "beat" else None
    unit = torch.nn.functional.normalize(protos.flatten(0, 1).float(), dim=-1)  # (P * (1 + k), D)
    sums = torch.zeros(5, p, k, dtype=torch.float64, device=device)  # sum x, y, xx, yy, xy
    step = max(1, batch_size // 4)  # a (B, W, P * (1 + k)) similarity map per step
    for i in range(0, len(index), step):
        x = torch.from_numpy(train.signals(index[i : i + step])).to(device)
        beats = torch.from_numpy(train.beats(index[i : i + step])).to(device)
        windows = torch.nn.functional.normalize(branch.latent_windows(x, beats).float(), dim=-1)
        # bf16 on a GPU: the reference local branch has ~17,800 (prototype, candidate) pairs x ~360 windows
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sim = windows @ unit.T  # cosines (B, W, P * (1 + k))
        pooled = layer.pool(layer.from_cosine(sim.float()), group).view(-1, p, 1 + k).double()  # (B, P, 1 + k)
        ref, cand = pooled[:, :, :1], pooled[:, :, 1:]
        sums += torch.stack(
            [
                ref.expand_as(cand).sum(0),
                cand.sum(0),
                (ref**2).expand_as(cand).sum(0),
                (cand**2).sum(0),
                (ref * cand).sum(0),
            ]
        )
    n = len(index)
    sx, sy, sxx, syy, sxy = sums
    cov = sxy - sx * sy / n
    var = (sxx - sx**2 / n).clamp(min=0) * (syy - sy**2 / n).clamp(min=0)
    r = torch.where(var > 0, cov / var.sqrt().clamp(min=1e-300), torch.zeros_like(cov))
    return r.cpu().numpy()


@torch.no_grad()
def merge_near_duplicates(branch: Branch, preference: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Merge the projected `branch`'s near-duplicates in place (Branch.merge); return the (duplicate, keeper) pairs,
    indices within the branch.

    Two prototypes whose latents have a cosine >= `threshold` (of the same lead group, for beat prototypes) are one
    case shown twice. Best `preference` first (e.g. fidelity: the truest stand-in for its trained prototype), each
    prototype is kept unless it is that near a prototype already kept; then it merges into the nearest of those.
    The kept prototypes are pairwise below the threshold; a class may end with fewer distinct cases than it was
    given prototypes, and a keeper may speak for two classes whose prototypes sat on near-identical beats."""
    cos = prototype_cosines(branch)
    order = np.argsort(-np.nan_to_num(np.asarray(preference, dtype=float), nan=-np.inf), kind="stable")
    kept: list[int] = []
    pairs: list[tuple[int, int]] = []
    for j in (int(i) for i in order):
        near = [k for k in kept if float(cos[j, k]) >= threshold]
        if near:
            keeper = max(near, key=lambda k: float(cos[j, k]))
            branch.merge(j, keeper)
            pairs.append((j, keeper))
        else:
            kept.append(j)
    return pairs
