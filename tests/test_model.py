"""Model pieces: losses, receptive fields, lead localisation, strict loading, whole-fold metrics."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ecgproto.data.labels import load_label_set
from ecgproto.data.leads import LEADS
from ecgproto.evaluation.metrics import (
    auroc_per_label,
    bootstrap_auroc,
    macro_auroc,
    paired_bootstrap_difference,
)
from ecgproto.model.backbones import CABRERA, Backbone1D, Backbone2D
from ecgproto.model.config import BackboneConfig, BranchConfig, FusionConfig, ModelConfig
from ecgproto.model.fusion import Fusion
from ecgproto.model.network import build_branch
from ecgproto.train import losses
from ecgproto.train.config import BaselineConfig, LossWeights, StageConfig, TrainConfig
from ecgproto.train.trainer import FitResult, fit

SMALL_BACKBONE = BackboneConfig(widths=(4, 8, 8, 16), blocks=(1, 1, 1, 1))


def test_diversity_is_zero_for_orthogonal_prototypes_and_positive_for_duplicates() -> None:
    assert losses.diversity(torch.eye(6) * 3.0).item() == pytest.approx(0.0, abs=1e-7)
    twins = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert losses.diversity(twins).item() == pytest.approx(2 / 9)


def test_contrastive_pulls_prototypes_of_cooccurring_classes_together() -> None:
    identity = torch.eye(3)  # one prototype per class; classes 0 and 1 co-occur, 2 never does
    jac = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    together = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    apart = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mixed_up = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0]])  # 2 sits on class 0
    assert losses.contrastive(together, identity, jac) < losses.contrastive(apart, identity, jac)
    assert losses.contrastive(apart, identity, jac) < losses.contrastive(mixed_up, identity, jac)


def test_jaccard_and_pos_weight_follow_their_definitions() -> None:
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.uint8)
    j = losses.jaccard(y)
    assert j[0, 1] == pytest.approx(2 / 4) and j[2, 2] == 1.0 and j[0, 2] == 0.0
    total = y.sum()  # T = all positive labels in train
    assert losses.pos_weight(y).numpy() == pytest.approx([(total - 3) / 3, (total - 3) / 3, 1.0])


def test_a_teacher_moves_only_the_bce_and_by_the_share_asked_for() -> None:
    """loss.distill = a: the BCE aims a of the way from the labels to the black box's scores (the same as mixing the
    two BCEs), while the clustering and separation terms still follow the labels."""
    g = torch.Generator().manual_seed(0)
    logits, sims = torch.randn(6, 2, generator=g), torch.rand(6, 2, generator=g)
    y = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])
    teacher = torch.rand(6, 2, generator=g)
    w = torch.tensor([2.0, 3.0])
    mixed = losses.bce(logits, losses.soft_targets(y, teacher, 0.3), w)
    assert mixed.item() == pytest.approx((0.7 * losses.bce(logits, y, w) + 0.3 * losses.bce(logits, teacher, w)).item())
    assert torch.equal(losses.soft_targets(y, teacher, 0.0), y) and torch.equal(losses.soft_targets(y, None, 0.5), y)
    identity, jac, protos = torch.eye(2), torch.eye(2), torch.randn(2, 4, generator=g)
    weights = LossWeights(distill=0.5)
    parts_t: dict[str, torch.Tensor] = {}
    parts_y: dict[str, torch.Tensor] = {}
    losses.joint_loss(logits, sims, protos, y, identity, jac, w, weights, parts_t, teacher)
    losses.joint_loss(logits, sims, protos, y, identity, jac, w, weights, parts_y)
    assert parts_t["bce"] != parts_y["bce"]
    for term in ("clustering", "separation", "diversity", "contrastive"):
        assert torch.equal(parts_t[term], parts_y[term])


def test_a_teacher_needs_the_black_box_and_dropping_the_black_box_drops_the_teacher() -> None:
    with pytest.raises(ValueError, match="enable the baseline"):
        TrainConfig(loss=LossWeights(distill=0.5), baseline=BaselineConfig(enabled=False))
    cfg = TrainConfig(loss=LossWeights(distill=0.5)).without_baseline()
    assert not cfg.baseline.enabled and cfg.loss.distill == 0.0


def test_clustering_uses_positive_cells_and_separation_only_foreign_classes() -> None:
    identity = torch.tensor([[1.0, 0], [0, 1.0]])  # prototype 0 -> class 0, 1 -> class 1
    sims = torch.tensor([[0.9, 0.2], [0.1, 0.7]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # positive cells: (0, c0) -> 0.9, (1, c0) -> 0.1, (1, c1) -> 0.7
    assert losses.clustering(sims, y, identity).item() == pytest.approx(-(0.9 + 0.1 + 0.7) / 3)
    # record 0 lacks class 1 -> 0.2; record 1 has every class -> not counted (own prototypes never penalised)
    assert losses.separation(sims, y, identity).item() == pytest.approx(0.2)


def _input_support(net: torch.nn.Module, index: tuple, n: int = 1000) -> np.ndarray:
    x = torch.randn(1, 12, n, requires_grad=True)
    net.eval()
    net(x)[index].backward()
    return x.grad[0].abs().numpy()


@pytest.mark.parametrize("dims", [1, 2])
def test_receptive_field_covers_exactly_the_samples_a_feature_column_sees(dims: int) -> None:
    torch.manual_seed(0)
    net = Backbone1D(SMALL_BACKBONE) if dims == 1 else Backbone2D(SMALL_BACKBONE)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()  # positive weights: no cancellation, the gradient reaches the whole field
    net.eval()
    for col in (0, 5, 31):
        index = (0, 0, col) if dims == 1 else (0, 0, 3, col)
        grad = _input_support(net, index).sum(axis=0)
        seen = np.flatnonzero(grad > 0)
        lo, hi = net.time_field.samples(col, 1, 1000)
        assert seen.min() >= lo and seen.max() < hi  # never outside the field
        assert seen.min() <= lo + net.time_field.jump and seen.max() >= hi - 1 - net.time_field.jump


def test_2d_backbone_keeps_the_lead_axis_and_names_the_leads_a_row_sees() -> None:
    torch.manual_seed(0)
    net = Backbone2D(SMALL_BACKBONE)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    out = net(torch.randn(2, 12, 1000))
    assert out.shape[2] == 12  # one feature row per lead (Cabrera order)
    for row in (0, 3, 11):
        grad = _input_support(net, (0, 0, row, 10)).sum(axis=1)
        reached = {LEADS[i] for i in np.flatnonzero(grad > 0)}
        assert reached == set(net.leads_seen(row))
        assert CABRERA[row].lstrip("-") in reached and len(reached) <= 3


def test_branch_weights_load_strictly_and_a_prefix_mismatch_fails() -> None:
    cfg = ModelConfig.small()
    labels = load_label_set()
    a, b = build_branch("rhythm_1d", cfg, labels), build_branch("rhythm_1d", cfg, labels)
    b.load_state_dict(a.state_dict(), strict=True)
    prefixed = {f"module.{k}": v for k, v in a.state_dict().items()}  # what DataParallel checkpoints look like
    with pytest.raises(RuntimeError, match="Missing key"):
        b.load_state_dict(prefixed, strict=True)


def test_fusion_stays_non_negative_and_its_contributions_explain_the_logit() -> None:
    label = torch.tensor([0, 0, 1, 2])
    f = Fusion(label, torch.full((4,), 2.0), 3, FusionConfig())
    with torch.no_grad():
        f.weight.sub_(5.0 * torch.rand_like(f.weight))
    f.constrain()
    assert (f.effective_weight() >= 0).all()  # a prototype can only add evidence
    contrib = f.contributions(torch.tensor([[2.0, 1.0, 0.0, 2.0]]))
    logits = f(torch.tensor([[2.0, 1.0, 0.0, 2.0]]))
    assert torch.allclose(contrib.sum(-1) + f.bias, logits)  # contributions explain the logit exactly


def test_whole_fold_auroc_matches_sklearn_and_bootstrap_brackets_it() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((400, 5)) < [0.05, 0.2, 0.5, 0.8, 0.0]).astype(np.uint8)
    score = rng.normal(size=(400, 5)) + y * 1.2
    score[:40, 1] = np.round(score[:40, 1])  # ties
    auc = auroc_per_label(y, score)
    for j in range(4):
        assert auc[j] == pytest.approx(roc_auc_score(y[:, j], score[:, j]), abs=1e-12)
    assert np.isnan(auc[4])  # no positives: not scored, not counted as 0.5
    assert macro_auroc(y, score) == pytest.approx(np.mean(auc[:4]))
    lo, hi, mlo, mhi = bootstrap_auroc(y, score, n_boot=300, seed=0)
    assert (lo[:4] < auc[:4]).all() and (auc[:4] < hi[:4]).all() and mlo[0] < macro_auroc(y, score) < mhi[0]


def test_paired_difference_sees_a_small_consistent_gain_that_two_separate_cis_cannot() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((300, 6)) < 0.15).astype(np.uint8)
    y[:, 5] = 0  # a label without positives is left out of both macros
    b = rng.normal(size=y.shape) + 1.0 * y
    a = b + 0.15 * y * rng.random(y.shape)  # the same model, a little better on every positive
    d, lo, hi = paired_bootstrap_difference(y, a, b, n_boot=400, seed=0)
    assert d == pytest.approx(macro_auroc(y, a) - macro_auroc(y, b), abs=1e-12)
    assert 0 < lo < d < hi  # the gain is resolved ...
    _, _, a_lo, _ = bootstrap_auroc(y, a, n_boot=400, seed=0)
    _, _, _, b_hi = bootstrap_auroc(y, b, n_boot=400, seed=0)
    assert a_lo[0] < b_hi[0]  # ... where the two models' own CIs overlap
    assert paired_bootstrap_difference(y, b, b, n_boot=50, seed=0) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_difference(y, b, a, n_boot=400, seed=0) == pytest.approx((-d, -hi, -lo))


def test_exp_cosine_similarity_rewards_nearness_and_keeps_the_cosine_ranking() -> None:
    from ecgproto.model.prototypes import PrototypeLayer

    torch.manual_seed(0)
    cosine = PrototypeLayer(1, 8, scale=3.0)
    near = PrototypeLayer(1, 8, scale=3.0, similarity="exp_cosine")
    near.prototypes.data.copy_(cosine.prototypes.data)
    proto = torch.nn.functional.normalize(cosine.prototypes.data[0], dim=0)
    other = torch.randn(8)
    other = torch.nn.functional.normalize(other - (other @ proto) * proto, dim=0)  # orthogonal to the prototype
    angles = torch.linspace(0, torch.pi, 7)
    windows = (torch.cos(angles)[:, None] * proto + torch.sin(angles)[:, None] * other)[None]  # cos 1 .. -1
    c = cosine.similarity_map(windows)[0, :, 0] / 3.0
    e = near.similarity_map(windows)[0, :, 0]
    assert torch.allclose(c, torch.cos(angles), atol=1e-5)
    assert e[0].item() == pytest.approx(3.0, abs=1e-5)  # the prototype itself scores the full scale
    assert (e.diff() < 0).all()  # same order as the cosine: projection's nearest window is unchanged
    # the slope is steepest near the prototype and flat far from it (cosine: the same everywhere)
    step = e.diff().abs() / torch.cos(angles).diff().abs()
    assert step[0] > 2 * step[-1]
    assert e[-1].item() == pytest.approx(3.0 * (2 * np.exp(-2.0) - 1), abs=1e-5)
    with pytest.raises(ValueError, match="similarity"):
        PrototypeLayer(1, 8, scale=1.0, similarity="euclid")


def test_lead_mean_pooling_rewards_a_morphology_that_recurs_along_one_lead_row() -> None:
    from ecgproto.model.prototypes import PrototypeLayer

    layer = PrototypeLayer(2, 4, scale=1.0, pool="lead_mean", rows=3)
    grid = torch.zeros(1, 3, 4, 2)  # (B, rows, time columns, prototypes)
    grid[0, 0, 1, 0] = 1.0  # prototype 0: one strong window in row 0 ...
    grid[0, 2, :, 0] = torch.tensor([0.5, 0.6, 0.9, 0.6])  # ... but it recurs along row 2
    grid[0, 1, 3, 1] = 0.8  # prototype 1: a single match in row 1
    sim_map = grid.reshape(1, 12, 2)
    pooled = layer.pool(sim_map)[0]
    assert pooled[0].item() == pytest.approx(0.65)  # row 2's mean beats row 0's lone window (0.25)
    assert pooled[1].item() == pytest.approx(0.2)
    # the window shown is the best column of the row that set the score, not the global best window
    assert layer.best_window(sim_map)[0].tolist() == [2 * 4 + 2, 1 * 4 + 3]
    with pytest.raises(ValueError, match="rows"):
        layer.pool(torch.zeros(1, 10, 2))


def test_configurations_name_only_what_this_version_builds() -> None:
    """Every option is checked: a misspelt key or a retired pooling is an error, not a silent default."""
    with pytest.raises(ValueError, match="prototypes_per_klass"):
        BranchConfig.model_validate({"kind": "global_1d", "prototypes_per_klass": 3, "scale": 3.0})
    with pytest.raises(ValueError, match="pool"):
        BranchConfig.model_validate({"kind": "local_2d", "prototypes_per_class": 3, "scale": 3.0, "pool": "focal"})
    with pytest.raises(ValueError, match="beat"):
        BranchConfig.model_validate({"kind": "global_1d", "prototypes_per_class": 3, "scale": 3.0, "pool": "beat"})


def _beats(n: int, inverted_t_in_v1: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12, 1000) ECG-like beats at a random rate and phase per record, V1's T wave inverted where asked, and
    each record's R peaks (n, 16), -1 padded."""
    t = np.arange(1000)
    out = np.empty((n, 12, 1000), dtype=np.float32)
    peaks = np.full((n, 16), -1, dtype=np.int64)
    for i in range(n):
        period, phase = rng.integers(70, 110), rng.integers(0, 100)
        u = (t + phase) % period
        qrs = np.exp(-0.5 * ((u - 20) / 2.5) ** 2)
        twave = 0.35 * np.exp(-0.5 * ((u - 45) / 6.0) ** 2)
        for lead in range(12):
            sign = -1.0 if inverted_t_in_v1[i] and lead == LEADS.index("V1") else 1.0
            out[i, lead] = (0.6 + 0.1 * lead) * qrs + sign * twave + 0.03 * rng.normal(size=1000)
        r = t[(u == 20)]
        peaks[i, : len(r)] = r[:16]
    return torch.from_numpy(out), torch.from_numpy(peaks)


def _beat_branch(**update: object) -> torch.nn.Module:
    cfg = ModelConfig.small()
    assert cfg.branches["morphology_2d_local"].pool == "beat"
    cfg.branches["morphology_2d_local"] = cfg.branches["morphology_2d_local"].model_copy(update=update)
    return build_branch("morphology_2d_local", cfg, load_label_set())


def test_beat_pooling_averages_beat_windows_and_compares_a_prototype_with_its_own_lead_group_only() -> None:
    torch.manual_seed(0)
    branch = _beat_branch().eval()
    groups = [branch.group_leads(g) for g in range(branch.window_grid[0])]
    cabrera = tuple(lead.lstrip("-") for lead in CABRERA)
    assert groups == [("aVL", "I", "aVR"), ("II", "aVF", "III"), ("V1", "V2", "V3"), ("V4", "V5", "V6"), cabrera]
    assert branch.prototypes.group.tolist()[:10] == [0, 1, 2, 3, 4] * 2  # every class has one in each group
    x, peaks = _beats(2, np.array([False, False]), np.random.default_rng(0))
    with torch.no_grad():
        z, pos = branch.beat_latents(x, peaks)  # (2, 8 beats, 4 groups, D')
        assert z.shape[:3] == (2, branch.n_beats, 5)
        assert set(pos[0].tolist()) <= set(peaks[0].tolist())  # windows sit on the record's own beats
        assert torch.allclose(branch.latent_windows(x, peaks), z.mean(dim=1), atol=1e-6)  # mean over beats
        before = branch(x, peaks)[1]
        changed = x.clone()
        changed[:, [LEADS.index(lead) for lead in ("V1", "V2", "V3")]] *= -1.0  # only group 2's leads change
        after = branch(changed, peaks)[1]
    sees = (branch.prototypes.group == 2) | (branch.prototypes.group == 4)  # V1-V3, and the whole beat
    assert torch.equal(before[:, ~sees], after[:, ~sees])  # no other prototype sees V1-V3
    for group in (2, 4):
        assert (before - after)[:, branch.prototypes.group == group].abs().max() > 1e-3
    ext = branch.extent(5 * 5 + 1, beat_position=int(pos[0, 5]))  # beat slot 5, group 1
    assert (ext.end - ext.start) / 100.0 <= 1.5 and ext.leads == ("II", "aVF", "III") and ext.column == 5
    assert ext.start == int(pos[0, 5]) - branch.beat_pre  # the P-QRS-T window around the R peak


def test_beat_windows_are_spread_over_the_record_and_fall_back_to_a_grid_without_beats() -> None:
    branch = _beat_branch(beats=4).eval()
    beats = torch.tensor(
        [
            [20, 100, 200, 300, 400, 500, 600, 700, 800, 990],  # 20 and 990: no whole window
            [150, 450, -1, -1, -1, -1, -1, -1, -1, -1],
            [-1] * 10,
        ]
    )
    pos = branch.select_beats(beats, 1000)
    assert pos[0].tolist() == [200, 400, 600, 800]  # evenly spread, never a window cut by the record's edge
    assert sorted(pos[1].tolist()) == [150, 150, 450, 450]  # fewer beats than slots: each counts the same
    assert pos[2].min() >= branch.beat_pre and pos[2].max() <= 1000 - branch.beat_post  # beat-scale grid
    branch.train()
    torch.manual_seed(0)
    drawn = branch.select_beats(beats, 1000)
    assert drawn.shape == (3, branch.train_beats)
    assert ((drawn >= branch.beat_pre) & (drawn <= 1000 - branch.beat_post)).all()


def test_beat_branch_learns_a_morphology_planted_in_one_lead_and_points_at_that_lead_group() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    branch = _beat_branch()
    y_train, y_test = rng.random(192) < 0.5, rng.random(96) < 0.5
    (x_train, b_train), (x_test, b_test) = _beats(192, y_train, rng), _beats(96, y_test, rng)
    opt = torch.optim.Adam(branch.parameters(), lr=3e-3)
    target = torch.as_tensor(y_train, dtype=torch.float32)
    for _ in range(6):
        for i in torch.randperm(192).split(32):
            logits = branch(x_train[i], b_train[i])[0][:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    branch.eval()
    with torch.no_grad():
        logits, sims = branch(x_test, b_test)
    assert roc_auc_score(y_test, logits[:, 0].numpy()) > 0.95  # the T wave of one lead, at any rate and phase
    # of class 0's prototypes on the four lead groups, the one on V1-V3 tells the classes apart best
    groups = branch.prototypes.group[:5].tolist()
    aucs = {g: roc_auc_score(y_test, sims[:, j].numpy()) for j, g in enumerate(groups) if g < 4}
    best = max(aucs, key=lambda g: abs(aucs[g] - 0.5))
    assert branch.group_leads(best) == ("V1", "V2", "V3"), aucs


def test_the_rhythm_strip_shows_the_highlighted_window_on_its_own_lead() -> None:
    from matplotlib.figure import Figure

    from ecgproto.figures import draw_ecg

    signal = np.zeros((12, 1000), dtype=np.float32)

    def strip_label(leads: tuple[str, ...] | None) -> str:
        ax = Figure().subplots()
        draw_ecg(ax, signal, 100.0, highlight=(2.0, 4.5), highlight_leads=leads)
        return min(ax.texts, key=lambda t: t.get_position()[1]).get_text()  # the lowest label: the 10 s strip

    assert strip_label(None) == "II"
    assert strip_label(("II", "aVF", "III")) == "II"
    # V4-V6 are drawn at 7.5-10 s only, so a 2-4.5 s window there shows on a V5 strip, not on lead II
    assert strip_label(("V4", "V5", "V6")) == "V5"


_G = torch.Generator().manual_seed(0)
_X = torch.randn(512, 8, generator=_G)
_Y = _X @ torch.randn(8, 1, generator=_G) + torch.randn(512, 1, generator=_G)
_SOLUTION = torch.linalg.lstsq(_X.double(), _Y.double()).solution.float()  # once: every run scores against it


def _noisy_regression_fit(
    tmp_path: Path, kill_after: int | None = None
) -> tuple[torch.nn.Linear, torch.Tensor, FitResult]:
    """A linear model fitted by Adam steps on minibatches of noisy targets: the iterates jitter around the
    least-squares solution; returns the fitted model, the solution and the fit result."""
    x, y, solution = _X, _Y, _SOLUTION
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = StageConfig(epochs=6, lr=0.05, batch_size=16, patience=6, schedule="constant")

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        return ((x[i], y[i]) for i in order.split(16))

    def validate() -> float:  # higher is better: minus the distance to the solution
        return -float((model.weight.detach().T - solution).norm())

    def on_epoch(epoch: int, metrics: dict) -> None:
        if kill_after is not None and epoch == kill_after:
            raise KeyboardInterrupt

    result = fit(
        model,
        model.parameters(),
        lambda b: ((model(b[0]) - b[1]) ** 2).mean(),
        batches,
        validate,
        cfg,
        steps_per_epoch=32,
        checkpoint=tmp_path / "stage.ckpt",
        seed=0,
        on_epoch=on_epoch,
    )
    return model, solution, result


def test_a_fit_killed_after_its_second_epoch_resumes_to_the_unbroken_result(tmp_path: Path) -> None:
    model, solution, unbroken = _noisy_regression_fit(tmp_path / "unbroken")
    # what the stage hands on is the state it scored best
    assert float((model.weight.detach().T - solution).norm()) == pytest.approx(-unbroken.best_score, rel=1e-4)
    with pytest.raises(KeyboardInterrupt):
        _noisy_regression_fit(tmp_path / "killed", kill_after=1)
    resumed_model, _, resumed = _noisy_regression_fit(tmp_path / "killed")
    assert resumed.resumed_from == 2 and resumed.history == unbroken.history
    assert torch.equal(resumed_model.weight, model.weight)


def test_the_joint_loss_reports_its_terms_and_they_add_up_to_it() -> None:
    g = torch.Generator().manual_seed(0)
    logits, sims = torch.randn(8, 3, generator=g), torch.rand(8, 6, generator=g)
    prototypes = torch.randn(6, 16, generator=g)
    targets = (torch.rand(8, 3, generator=g) < 0.4).float()
    identity = torch.zeros(6, 3)
    identity[torch.arange(6), torch.arange(6) % 3] = 1
    parts: dict[str, torch.Tensor] = {}
    w = LossWeights()
    from ecgproto.train import losses

    total = losses.joint_loss(logits, sims, prototypes, targets, identity, torch.eye(3), None, w, parts)
    assert set(parts) == {"bce", "clustering", "separation", "diversity", "contrastive"}
    assert torch.isclose(sum(parts.values()), total)
    assert parts["clustering"] <= 0  # why the total can be negative: clustering is minus a similarity
