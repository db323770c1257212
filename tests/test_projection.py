"""Projection on a real (ingested demo) training split: exact real windows that keep the prototype's behaviour.

The cases where projection picks by fidelity instead of nearness: the local branch (beat windows of its own lead
group; lead_mean: many windows pooled) and the rhythm branch (one whole-record window per ECG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set
from ecgproto.model.config import ModelConfig
from ecgproto.model.network import build_branch
from ecgproto.train.data import SplitData
from ecgproto.train.projection import project_prototypes


@pytest.mark.parametrize(
    ("name", "pool", "n_windows", "margin"),
    [("morphology_2d_local", "lead_mean", 12 * 30, 0.05), ("rhythm_1d", "max", 1, 0.01)],
)
def test_projection_keeps_the_trained_prototypes_pooled_behaviour(
    demo_root: Path, tmp_path: Path, name: str, pool: str, n_windows: int, margin: float
) -> None:
    store = ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1), progress=False).store
    labels = load_label_set()
    torch.manual_seed(0)
    cfg = ModelConfig.small()
    if cfg.branches[name].pool != pool:  # the reference's pooling and similarity on the small widths
        reference = ModelConfig().branches[name]
        assert reference.pool == pool
        cfg.branches[name] = cfg.branches[name].model_copy(
            update={k: getattr(reference, k) for k in ("pool", "similarity", "scale", "window_leads")}
        )
    branch = build_branch(name, cfg, labels).eval()
    assert branch.prototypes.pool_mode == pool
    train, idx = SplitData(store, "train"), labels.branch_indices(name)
    with torch.no_grad():
        windows = F.normalize(branch.latent_windows(torch.from_numpy(train.signals(np.arange(len(train))))), dim=-1)
    assert windows.shape[1] == n_windows == branch.n_windows  # what projection decides by

    def pooled(protos: torch.Tensor) -> np.ndarray:  # (N, P) pooled similarities over the training records
        layer = branch.prototypes
        with torch.no_grad():
            return layer.pool(layer.from_cosine(windows @ F.normalize(protos, dim=-1).T)).numpy()

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    trained = branch.prototypes.prototypes.detach().clone()
    before = pooled(trained)
    provenance = project_prototypes(branch, train, idx, labels.codes, 100.0)
    after = pooled(branch.prototypes.prototypes.detach())
    own = provenance[provenance["own_class_source"]]
    assert len(own) >= 9
    cls = branch.prototype_class.numpy()
    positives = train.labels[:, idx][:, cls].astype(bool)  # (N, P) records of each prototype's class
    chosen, nearest = [], []
    for _, p in own.iterrows():
        j = int(p["index_in_branch"])
        record = list(train.record_ids).index(p["ecg_id"])
        assert positives[record, j]
        latent = branch.latent_windows(torch.from_numpy(train.signals(np.array([record]))))[0, int(p["window"])]
        assert torch.allclose(branch.prototypes.prototypes[j], latent, atol=1e-5)  # a real window (batch-size rounding)
        # fidelity: the Pearson r, over the training records, of the pooled similarities before and after
        assert abs(p["fidelity"] - corr(before[:, j], after[:, j])) < 1e-4
        # ProtoPNet's rule would take the nearest window of a positive record
        cos = (windows @ F.normalize(trained[j], dim=0)).masked_fill(~torch.as_tensor(positives[:, j])[:, None], -2)
        flat = int(cos.flatten().argmax())
        siblings = own[(own["class"] == p["class"]) & (own["index_in_branch"] != j)]
        if str(train.record_ids[flat // windows.shape[1]]) in set(siblings["ecg_id"]):
            continue  # the nearest record went to another prototype of the class (one record per prototype)
        near = trained.clone()
        # the nearest window may be the one taken: then compare it as projection computed it (batch sizes round it)
        same = divmod(flat, windows.shape[1]) == (record, int(p["window"]))
        near[j] = (
            branch.prototypes.prototypes[j] if same else windows[flat // windows.shape[1], flat % windows.shape[1]]
        )
        chosen.append(p["fidelity"])
        nearest.append(corr(before[:, j], pooled(near)[:, j]))
        # the nearest window was free to take, so the window taken is at least as faithful
        assert chosen[-1] >= nearest[-1] - 1e-4, (j, chosen[-1], nearest[-1])
    # ... and, over the prototypes, clearly more faithful than the nearest windows
    assert len(chosen) >= 6
    assert np.mean(chosen) > np.mean(nearest) + margin, (np.mean(chosen), np.mean(nearest))


def test_beat_prototypes_become_single_real_beats_of_their_own_lead_group(demo_root: Path, tmp_path: Path) -> None:
    """Beat pooling: what is projected is one beat window of a positive training record in the prototype's own
    lead group (not a record's mean over beats), its provenance gives that beat's 1.28 s span and leads, and the
    beat taken is at least as faithful as the nearest beat."""
    store = ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1), progress=False).store
    labels = load_label_set()
    torch.manual_seed(0)
    branch = build_branch("morphology_2d_local", ModelConfig.small(), labels).eval()
    assert branch.prototypes.pool_mode == "beat"
    train, idx = SplitData(store, "train"), labels.branch_indices("morphology_2d_local")
    trained = branch.prototypes.prototypes.detach().clone()
    everyone = np.arange(len(train))
    x_all, b_all = torch.from_numpy(train.signals(everyone)), torch.from_numpy(train.beats(everyone))
    with torch.no_grad():
        pooled_latents = F.normalize(branch.latent_windows(x_all, b_all), dim=-1)  # (N, 4 groups, D')
        beat_latents = branch.beat_latents(x_all, b_all)[0]  # (N, 8 beats, 4 groups, D')

    def pooled(protos: torch.Tensor) -> np.ndarray:  # (N, P) pooled similarities over the training records
        layer = branch.prototypes
        with torch.no_grad():
            return layer.pool(layer.from_cosine(pooled_latents @ F.normalize(protos, dim=-1).T)).numpy()

    before = pooled(trained)
    provenance = project_prototypes(branch, train, idx, labels.codes, 100.0)
    own = provenance[provenance["own_class_source"]]
    assert len(own) >= 9 and set(own["beat_source"]) <= {"detected", "grid"}
    cls = branch.prototype_class.numpy()
    positives = train.labels[:, idx][:, cls].astype(bool)  # (N, P)
    chosen, nearest = [], []
    group_leads = {g: ",".join(branch.group_leads(g)) for g in range(branch.window_grid[0])}
    for _, p in own.iterrows():
        j = int(p["index_in_branch"])
        group = int(branch.prototypes.group[j])
        record = list(train.record_ids).index(p["ecg_id"])
        assert train.labels[record, idx][branch.prototype_class[j]] == 1  # a record of the prototype's class
        assert p["leads"] == group_leads[group] and p["row"] == group  # its own lead group, named
        assert p["end_s"] - p["start_s"] <= 1.5  # one beat, P wave to T end
        x = torch.from_numpy(train.signals(np.array([record])))
        with torch.no_grad():
            z, pos = branch.beat_latents(x, torch.from_numpy(train.beats(np.array([record]))))
        slot = int(p["column"])
        assert int(pos[0, slot]) - branch.beat_pre == p["window_start"]  # the window around that beat's R peak
        assert torch.allclose(branch.prototypes.prototypes[j], z[0, slot, group], atol=1e-5)  # that beat's latent
        assert int(pos[0, slot]) in set(train.beats(np.array([record]))[0].tolist())  # a detected (or grid) beat
        # ProtoPNet's rule would take the nearest beat (of its group, of a positive record)
        cos = F.normalize(beat_latents[:, :, group], dim=-1) @ F.normalize(trained[j], dim=0)  # (N, 8)
        cos = cos.masked_fill(~torch.as_tensor(positives[:, j])[:, None], -2)
        rec = int(cos.max(dim=1).values.argmax())
        siblings = own[(own["class"] == p["class"]) & (own["index_in_branch"] != j)]
        if str(train.record_ids[rec]) in set(siblings["ecg_id"]):
            continue  # the nearest record went to another prototype of the class (one record per prototype)
        near = trained.clone()
        near[j] = beat_latents[rec, int(cos[rec].argmax()), group]
        chosen.append(p["fidelity"])
        nearest.append(float(np.corrcoef(before[:, j], pooled(near)[:, j])[0, 1]))
        assert chosen[-1] >= nearest[-1] - 1e-3, (j, chosen[-1], nearest[-1])
    assert len(chosen) >= 6 and np.mean(chosen) > np.mean(nearest)
