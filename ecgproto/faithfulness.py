"""Are the explanations faithful? Masking the beats an explanation points at should lower the label more than
masking as many random windows of the same leads.

For each explained (ECG, label), the local (beat) evidence `ecgproto.explain` shows (the label's own prototypes
first, then other labels' cases the ECG resembles) highlights one beat window per prototype in the prototype's
leads. Those windows are replaced by each lead's baseline (its median) and the ECG is scored again; so is the ECG
with as many windows of the same length, at random places, masked in the same leads (`n_random` draws). An
explanation is faithful when masking its evidence drops the label's calibrated probability more than the random
masks do on average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ecgproto.data.leads import LEADS
from ecgproto.explain import evidence_order
from ecgproto.model.network import ECGProtoNet

LOCAL = "morphology_2d_local"


@torch.no_grad()
def masking_faithfulness(
    model: ECGProtoNet,
    signals: np.ndarray,
    beats: np.ndarray,
    labels: np.ndarray,
    branch_of: list[str],
    top_k: int = 3,
    n_random: int = 5,
    max_explanations: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per explanation of an ECG's positive label whose evidence includes local beats: `signals` (N, 12, n)
    preprocessed mV, `beats` (N, K) R peaks (-1 padded), `labels` (N, L) 0/1, `branch_of` each label's branch.
    Columns: ecg (row in `signals`), code, branch, windows (beat windows masked), p (calibrated probability),
    drop_evidence, drop_random (mean over the random masks), evidence_beats_random."""
    model.eval()
    if LOCAL not in model.branches or not model.branches[LOCAL].beat:
        raise ValueError("masking faithfulness measures beat evidence: the model's local branch has no beat pooling")
    rng = np.random.default_rng(seed)
    local = model.branches[LOCAL]
    at = model.prototype_offsets()[LOCAL]
    own = model.membership().numpy() > 0
    pairs = np.argwhere(labels > 0)  # (ECG, label) explanations, in ECG order
    if max_explanations is not None and len(pairs) > max_explanations:
        pairs = pairs[np.sort(rng.choice(len(pairs), max_explanations, replace=False))]
    rows: list[dict[str, object]] = []
    n = signals.shape[-1]
    length = local.beat_length
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ecgs = np.unique(chunk[:, 0])
        x = torch.as_tensor(np.asarray(signals[ecgs], dtype=np.float32))
        b = torch.as_tensor(np.asarray(beats[ecgs]), dtype=torch.long)
        sims = model.similarities(x, b)
        contrib = model.fusion.contributions(sims).numpy()  # (E, L, P)
        prob = model.uncertainty(sims)["probability"].numpy()
        where = _best_beat_starts(local, x, b)  # (E, P_local) first sample of each prototype's best beat
        copies, copy_beats, found = [], [], []
        for e, li in chunk:
            k = int(np.searchsorted(ecgs, e))
            order = evidence_order(contrib[k, li], own[li], top_k)
            shown = [p - at for p in order if at <= p < at + local.n_prototypes]
            windows = sorted({(int(where[k, j]), int(local.prototypes.group[j])) for j in shown})
            if not windows:
                continue
            leads = [[LEADS.index(lead) for lead in local.group_leads(g)] for _, g in windows]
            signal = x[k].numpy()
            copies.append(_mask(signal, [(s, ld) for (s, _), ld in zip(windows, leads, strict=True)], length))
            for _ in range(n_random):
                starts = rng.integers(0, max(n - length, 0) + 1, size=len(windows))
                copies.append(_mask(signal, list(zip(starts.tolist(), leads, strict=True)), length))
            copy_beats += [b[k].numpy()] * (1 + n_random)  # the beats stay where they were; only their shape goes
            found.append((int(e), int(li), len(windows), float(prob[k, li])))
        if not found:
            continue
        after = _score(model, np.stack(copies), np.stack(copy_beats), batch_size).reshape(len(found), 1 + n_random, -1)
        for (e, li, w, p), scored in zip(found, after, strict=True):
            rows.append(
                {
                    "ecg": e,
                    "code": model.codes[li],
                    "branch": branch_of[li],
                    "windows": w,
                    "p": p,
                    "drop_evidence": p - float(scored[0, li]),
                    "drop_random": p - float(scored[1:, li].mean()),
                }
            )
    table = pd.DataFrame(rows, columns=["ecg", "code", "branch", "windows", "p", "drop_evidence", "drop_random"])
    table["evidence_beats_random"] = table["drop_evidence"] > table["drop_random"]
    return table


def faithfulness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per branch of the explained label (and all together): explanations, the share where masking the evidence
    drops the label more than random masks, and the mean drop of each."""
    groups = [(b, g) for b, g in table.groupby("branch", sort=False)] + [("all", table)]
    return pd.DataFrame(
        [
            {
                "branch": b,
                "explanations": len(g),
                "share_evidence_beats_random": float(g["evidence_beats_random"].mean()),
                "mean_drop_evidence": float(g["drop_evidence"].mean()),
                "mean_drop_random": float(g["drop_random"].mean()),
            }
            for b, g in groups
            if len(g)
        ]
    )


def _best_beat_starts(local: torch.nn.Module, x: torch.Tensor, beats: torch.Tensor) -> np.ndarray:
    """(B, P): the first sample of each local prototype's best-matching single beat in its lead group (the beat an
    explanation highlights, ecgproto.explain.best_beats)."""
    z, pos = local.beat_latents(x, beats)  # (B, M, G, D'), (B, M)
    sim = local.prototypes.similarity_map(z.flatten(0, 1)).view(*z.shape[:2], z.shape[2], -1)  # (B, M, G, P)
    group = local.prototypes.group.view(1, 1, 1, -1).expand(sim.shape[0], sim.shape[1], 1, -1)
    own = sim.gather(2, group).squeeze(2)  # (B, M, P)
    slot = own.argmax(dim=1)  # (B, P)
    return (pos.gather(1, slot) - local.beat_pre).clamp(min=0).numpy()


def _mask(signal: np.ndarray, windows: list[tuple[int, list[int]]], length: int) -> np.ndarray:
    """A copy of (12, n) `signal` with each window (start, lead indices) of `length` samples set to each lead's
    median (its baseline)."""
    out = signal.copy()
    base = np.median(signal, axis=1)
    for start, leads in windows:
        out[leads, start : start + length] = base[leads, None]
    return out


def _score(model: ECGProtoNet, x: np.ndarray, beats: np.ndarray, batch_size: int) -> np.ndarray:
    """Calibrated probabilities (N, L) of preprocessed ECGs with their R peaks."""
    out = []
    for i in range(0, len(x), batch_size):
        sims = model.similarities(torch.as_tensor(x[i : i + batch_size]), torch.as_tensor(beats[i : i + batch_size]))
        out.append(model.uncertainty(sims)["probability"].numpy())
    return np.concatenate(out)
