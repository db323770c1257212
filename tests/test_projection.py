"""Projection on a real (ingested demo) training split: exact real windows that keep the prototype's behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set
from ecgproto.model.config import ModelConfig
from ecgproto.model.network import build_branch
from ecgproto.projection import project_prototypes
from ecgproto.train.data import SplitData


def test_projection_under_lead_mean_keeps_the_trained_prototypes_pooled_behaviour(demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    store = ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1), progress=False).store
    labels, name = load_label_set(), "morphology_2d_local"
    torch.manual_seed(0)
    branch = build_branch(name, ModelConfig.small(), labels).eval()
    assert branch.prototypes.pool_mode == "lead_mean"
    train, idx = SplitData(store, "train"), labels.branch_indices(name)
    with torch.no_grad():
        windows = F.normalize(branch.latent_windows(torch.from_numpy(train.signals(np.arange(len(train))))), dim=-1)

    def pooled(protos: torch.Tensor) -> np.ndarray:  # (N, P) pooled cosines over the training records
        with torch.no_grad():
            return branch.prototypes.pool(windows @ F.normalize(protos, dim=-1).T).numpy()

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
        near = trained.clone()
        near[j] = windows[flat // windows.shape[1], flat % windows.shape[1]]
        chosen.append(p["fidelity"])
        nearest.append(corr(before[:, j], pooled(near)[:, j]))
    # the windows taken reproduce the trained prototypes' pooled similarities better than the nearest windows do
    assert np.mean(chosen) > np.mean(nearest) + 0.05, (np.mean(chosen), np.mean(nearest))
