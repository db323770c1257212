"""Distinct cases: near-duplicate prototypes merge into one case, and the model's scores do not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecgproto.data.labels import load_label_set
from ecgproto.model.config import ModelConfig
from ecgproto.model.network import ECGProtoNet, build_branch
from ecgproto.train.projection import merge_near_duplicates
from ecgproto.train.quality import DUPLICATE_COS, _nearest_prototypes


def _random_model(seed: int = 0) -> ECGProtoNet:
    torch.manual_seed(seed)
    model = ECGProtoNet(ModelConfig.small(), load_label_set()).eval()
    with torch.no_grad():  # a trained-looking model: every head and fusion weight non-zero
        for branch in model.branches.values():
            branch.head.weight.uniform_(0.1, 1.0)
        model.fusion.weight.uniform_(0.0, 1.0)
        assert model.fusion_heads is not None
        model.fusion_heads.weight.uniform_(0.0, 1.0)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(3, 12, 1000, generator=g)
    beats = torch.arange(80, 1000, 90).repeat(3, 1)  # a beat every 0.9 s
    return x, beats


def test_a_planted_pair_of_identical_prototypes_merges_and_every_score_stays_the_same() -> None:
    model = _random_model()
    offsets = model.prototype_offsets()
    local = model.branches["morphology_2d_local"]
    rhythm = model.branches["rhythm_1d"]
    with torch.no_grad():
        # rhythm: two prototypes of one class made identical; local: a prototype of another class copied onto one
        # of the same lead group (two classes' prototypes on the same beat)
        rhythm.prototypes.prototypes[1] = rhythm.prototypes.prototypes[0]
        group = local.prototypes.group
        other = int(np.flatnonzero((group == group[0]).numpy() & (local.prototype_class != 0).numpy())[0])
        local.prototypes.prototypes[other] = local.prototypes.prototypes[0]
    x, beats = _batch()
    with torch.no_grad():
        before = model(x, beats)
        before_u = model.uncertainty(model.similarities(x, beats))
        branch_before = local(x, beats)[0]
    twin_r, keep_r = offsets["rhythm_1d"] + 1, offsets["rhythm_1d"]
    twin_l, keep_l = offsets["morphology_2d_local"] + other, offsets["morphology_2d_local"]
    model.merge(twin_r, keep_r)
    model.merge(twin_l, keep_l)
    with torch.no_grad():
        sims = model.similarities(x, beats)
        after = model(x, beats)
        after_u = model.uncertainty(sims)
        branch_after = local(x, beats)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(branch_after, branch_before, atol=1e-5, rtol=1e-5)
    for key in ("probability", "low", "high"):  # the bootstrap heads merged as well
        torch.testing.assert_close(after_u[key], before_u[key], atol=1e-5, rtol=1e-5)
    assert (sims[:, [twin_r, twin_l]] == 0).all()  # one case: the merged prototypes are no feature of their own
    assert model.distinct.sum() == model.n_prototypes - 2
    # the keeper now belongs to both classes of the local pair; the merged prototype to none
    own = model.membership()
    codes = model.codes
    cls_other = codes.index(local.classes[int(local.prototype_class[other])])
    cls_keep = codes.index(local.classes[int(local.prototype_class[0])])
    assert own[cls_other, keep_l] == 1 and own[cls_keep, keep_l] == 1 and own[:, twin_l].sum() == 0
    with pytest.raises(ValueError, match="distinct"):
        model.merge(twin_r, keep_r)  # already merged


def test_merging_leaves_no_near_duplicate_and_keeps_the_preferred_case() -> None:
    torch.manual_seed(0)
    branch = build_branch("rhythm_1d", ModelConfig.small(), load_label_set()).eval()
    p = branch.n_prototypes
    with torch.no_grad():
        z = branch.prototypes.prototypes
        base = z[0].clone()
        for j in (1, 2):  # class 0's three prototypes collapsed onto one (cosine ~0.99)
            z[j] = base + 0.05 * base.abs().mean() * torch.randn_like(base)
        z[4] = z[3]  # an exact twin in class 1
    preference = np.zeros(p)
    preference[2] = 1.0  # the most faithful of the collapsed three
    pairs = merge_near_duplicates(branch, preference, DUPLICATE_COS)
    assert {d for d, _ in pairs} == {0, 1, 4}
    assert dict(pairs)[0] == 2 and dict(pairs)[1] == 2  # merged into the preferred one
    kept = branch.distinct.numpy()
    unit = F.normalize(branch.prototypes.prototypes.detach(), dim=-1)[kept]
    cos = (unit @ unit.T).fill_diagonal_(0)
    assert cos.max() < DUPLICATE_COS  # what is left are distinct cases
    _, nearest_cos = _nearest_prototypes(branch)
    assert np.nanmax(nearest_cos) < DUPLICATE_COS
    assert branch.class_identity()[:, 0].sum() == 1  # class 0 has one distinct case now


def test_an_association_study_counts_a_merged_case_once() -> None:
    from ecgproto.phenotype.features import prototype_table

    model = _random_model()
    at = model.prototype_offsets()["rhythm_1d"]
    with torch.no_grad():
        model.branches["rhythm_1d"].prototypes.prototypes[1] = model.branches["rhythm_1d"].prototypes.prototypes[0]
    before = prototype_table(model)
    model.merge(at + 1, at)
    after = prototype_table(model)
    assert len(after) == len(before) - 1
    assert at in set(after["prototype"]) and at + 1 not in set(after["prototype"])  # one feature for the case
