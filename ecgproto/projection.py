"""Push every prototype onto the latent of a real training segment of its class, with provenance.

Each prototype becomes exactly the latent window (same pooling rule as training: the best window)
of the training record, positive for its class, that matches it best. Provenance records where
that window lies in the raw signal: the samples and leads its receptive field really sees.
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

    A prototype whose class has no positive training record (possible in small cohorts) is pushed
    onto the best-matching window of any training record and flagged `own_class_source=False`.
    """
    device = device or torch.device("cpu")
    branch.eval().to(device)
    p = branch.n_prototypes
    cls = branch.prototype_class.cpu().numpy()
    has_pos = train.labels[:, label_index].any(axis=0)[cls]  # (P,) class has a positive record
    # Running best per prototype, kept on the device; only the winners' indices come back per batch.
    best = {own: (torch.full((p,), -np.inf, device=device), torch.zeros(p, branch.prototype_dim, device=device),
                  np.full(p, -1), np.zeros(p, int)) for own in (True, False)}
    cls_t = torch.as_tensor(cls, device=device)
    for batch in train.batches(batch_size):
        windows = branch.latent_windows(batch.x.to(device)).float()  # (B, W, D)
        sim = branch.prototypes.similarity_map(windows) / branch.scale  # cosine (B, W, P)
        b, w, _ = sim.shape
        eligible = batch.y[:, label_index].to(device)[:, cls_t] > 0  # (B, P)
        flat_windows = windows.reshape(b * w, -1)
        for own in (True, False):
            masked = sim.masked_fill(~eligible.unsqueeze(1), -np.inf) if own else sim
            value, where = masked.reshape(b * w, p).max(dim=0)
            sim_best, latent, record, window = best[own]
            better = value > sim_best
            sim_best[better] = value[better]
            latent[better] = flat_windows[where[better]]
            hit, idx = better.cpu().numpy(), where.cpu().numpy()
            record[hit] = batch.index[idx[hit] // w]
            window[hit] = idx[hit] % w
    use_own = torch.as_tensor(has_pos, device=device)
    sims = torch.where(use_own, best[True][0], best[False][0]).cpu()
    latents = torch.where(use_own.unsqueeze(1), best[True][1], best[False][1])
    records = np.where(has_pos, best[True][2], best[False][2])
    windows_at = np.where(has_pos, best[True][3], best[False][3])
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
