"""The training stages as functions of (store, config, work folder) that write their result files.

  joint -> projection -> last layer (per branch), then fusion, the baseline, and the evaluation.

Each stage returns at once when its result file exists (a re-run after a kill redoes only what
was unfinished), and resumes mid-stage from its epoch checkpoint. The flow only sequences them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ecgproto.data.labels import BRANCHES, LabelSet, load_label_set
from ecgproto.data.store import ArrayStore, atomic_write_bytes, atomic_write_parquet
from ecgproto.errors import UserError
from ecgproto.evaluation.metrics import evaluation_table, macro_auroc, paired_bootstrap_difference
from ecgproto.model import persist
from ecgproto.model.baseline import ResNet1DClassifier
from ecgproto.model.branch import Branch
from ecgproto.model.network import ECGProtoNet, build_branch
from ecgproto.settings import reference_dir
from ecgproto.train import distributed, losses
from ecgproto.train.config import StageConfig, TrainConfig
from ecgproto.train.data import SplitData
from ecgproto.train.projection import merge_near_duplicates, project_prototypes
from ecgproto.train.quality import DUPLICATE_COS, mark_shared_sources, prototype_quality
from ecgproto.train.trainer import EpochCallback, FitResult, fit, load_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPLITS = ("train", "val", "test")
# explanations of the test fold's positive labels whose local evidence is masked (a seeded sample: ~1 min on 2 cores)
FAITHFULNESS_EXPLANATIONS = 1000


@dataclass(frozen=True)
class Step:
    """One stage of a training, as `plan` orders them: baseline, joint, projection, last_layer or fusion."""

    stage: str
    branch: str | None = None

    @property
    def key(self) -> str:
        """'joint.rhythm_1d', 'fusion': how logs and benchmarks name the step."""
        return f"{self.stage}.{self.branch}" if self.branch else self.stage


def plan(config: TrainConfig) -> list[Step]:
    """The order of a training's stages (evaluation follows them): the black box first when it teaches (the
    branches and the fusion learn from its scores), else last when it is trained at all; per branch the joint
    stage, the projection onto real cases and the last layer; then the fusion over all branches."""
    teacher = [Step("baseline")] if config.baseline_teaches else []
    after = [Step("baseline")] if config.baseline.enabled and not config.baseline_teaches else []
    branches = [Step(stage, name) for name in BRANCHES for stage in ("joint", "projection", "last_layer")]
    return [*teacher, *branches, Step("fusion"), *after]


def run_step(ctx: TrainContext, step: Step, on_epoch: EpochCallback | None = None) -> FitResult | pd.DataFrame:
    """Run one planned stage in this process (the flow runs them as Prefect tasks, DDP ranks through torchrun);
    a projection returns its provenance, every other stage its fit result."""
    if step.stage == "baseline":
        return train_baseline(ctx, on_epoch)
    if step.stage == "fusion":
        return train_fusion(ctx, on_epoch)
    assert step.branch is not None
    if step.stage == "joint":
        return train_joint(ctx, step.branch, on_epoch)
    if step.stage == "projection":
        return project(ctx, step.branch)
    if step.stage == "last_layer":
        return train_last_layer(ctx, step.branch, on_epoch)
    raise ValueError(f"unknown stage {step.stage!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_key(store: ArrayStore, cfg: TrainConfig) -> str:
    """What decides a training's result: the data, every setting except where it runs, and the training code
    (an upgraded ecgproto retrains instead of resuming from stage files its older self wrote)."""
    payload = cfg.model_dump(exclude={"threads", "device", "eval_batch_size", "world_size"})
    return hashlib.sha256(
        json.dumps([store.key, payload, _code_digest()], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """sha256 of the modules that decide what training produces: model/, train/ (stages, losses, projection), labels."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(
        [
            *(root / "model").glob("*.py"),
            *(root / "train").glob("*.py"),
            root / "data" / "labels.py",
            reference_dir() / "scp_branches.csv",
        ]
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@dataclass
class TrainContext:
    store: ArrayStore
    config: TrainConfig
    workdir: Path

    @classmethod
    def open(cls, store: str | Path, config: TrainConfig, work_root: str | Path) -> TrainContext:
        s = ArrayStore.open(store)
        if config.threads:
            torch.set_num_threads(config.threads)
        return cls(s, config, Path(work_root) / run_key(s, config))

    @cached_property
    def labels(self) -> LabelSet:
        return load_label_set()

    @cached_property
    def splits(self) -> dict[str, SplitData]:
        return {name: SplitData(self.store, name) for name in SPLITS}

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @cached_property
    def pos_weight(self) -> torch.Tensor:
        return losses.pos_weight(self.splits["train"].labels)

    @cached_property
    def fusion_pos_weight(self) -> torch.Tensor:
        """The positive-class weights of the fusion's BCE (and of its bootstrap heads)."""
        return self.pos_weight**self.config.loss.fusion_pos_weight_power

    @cached_property
    def jaccard(self) -> np.ndarray:
        return losses.jaccard(self.splits["train"].labels)

    def path(self, *parts: str) -> Path:
        p = self.workdir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def autocast(self) -> torch.autocast:
        enabled = self.device.type == "cuda" and self.config.amp
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


# --- helpers ----------------------------------------------------------------------------------


@torch.no_grad()
def _branch_outputs(ctx: TrainContext, branch: Branch, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits (N, C) and pooled similarities (N, P) of one split."""
    branch.eval().to(ctx.device)
    logits, sims = [], []
    for batch in ctx.splits[split].batches(ctx.config.eval_batch_size):
        with ctx.autocast():
            lo, si = branch(batch.x.to(ctx.device), batch.beats.to(ctx.device))
        logits.append(lo.float().cpu())
        sims.append(si.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(sims).numpy()


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], Iterator]:
    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(len(x)))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    return batches


def _steps(n: int, batch_size: int) -> int:
    return max((n + batch_size - 1) // batch_size, 1)


def finished(checkpoint: Path, output: Path) -> FitResult | None:
    """The result of a stage that already ran to its end (its output and final checkpoint exist)."""
    if not output.exists() or not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint)
    if state is None or not state.get("stopped"):
        return None
    return FitResult(state["best_epoch"], state["best"], state["history"], state["epoch"] + 1)


def load_branch(ctx: TrainContext, name: str, stage: str) -> Branch:
    branch = build_branch(name, ctx.config.model, ctx.labels)
    branch.load_state_dict(persist.load_weights(ctx.path(name, f"{stage}.pt")), strict=True)
    return branch


# --- stages -----------------------------------------------------------------------------------


def train_joint(ctx: TrainContext, name: str, on_epoch: EpochCallback | None = None) -> FitResult:
    """Backbone + add-on + prototypes; the head stays frozen at its initialisation (+1 own class)."""
    out, ckpt = ctx.path(name, "joint.pt"), ctx.path(name, "joint.ckpt")
    if (done := finished(ckpt, out)) is not None:
        return done
    cfg, w = ctx.config, ctx.config.loss
    torch.manual_seed(cfg.seed)
    branch = build_branch(name, cfg.model, ctx.labels).to(ctx.device)
    branch.head.weight.requires_grad_(False)
    net = distributed.wrap(branch, ctx.device)  # DDP under torchrun, else the branch itself
    part = distributed.rank_world()
    idx = ctx.labels.branch_indices(name)
    identity = branch.class_identity().to(ctx.device)
    jac = torch.as_tensor(ctx.jaccard[np.ix_(idx, idx)], dtype=torch.float32, device=ctx.device)
    pw = ctx.pos_weight[idx].to(ctx.device)
    train, val = ctx.splits["train"], ctx.splits["val"]
    teacher = teacher_scores(ctx)
    teacher = None if teacher is None else teacher[:, idx]  # this branch's labels

    def loss_fn(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
        x, y = batch.x.to(ctx.device), batch.y.to(ctx.device)
        soft = None if teacher is None else torch.as_tensor(teacher[batch.index], device=ctx.device)
        with ctx.autocast():
            logits, sims = net(x, batch.beats.to(ctx.device))
        parts: dict[str, torch.Tensor] = {}
        loss = losses.joint_loss(logits, sims, branch.prototypes.prototypes, y, identity, jac, pw, w, parts, soft)
        return loss, parts

    def validate() -> float:
        logits, _ = _branch_outputs(ctx, branch, "val")
        return macro_auroc(val.labels[:, idx], logits)

    def batches(epoch: int) -> Iterator:  # a beat window is the same crop at any roll: beat branches skip it
        return train.batches(
            cfg.joint.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
            time_roll=cfg.time_roll and not branch.beat,
            label_index=idx,
            part=part,
        )

    return _fit_on_ranks(
        ctx,
        branch,
        loss_fn,
        batches,
        validate,
        cfg.joint,
        len(train),
        ckpt,
        lambda: persist.save_atomic(branch.cpu().state_dict(), out),
        on_epoch,
    )


def _fit_on_ranks(
    ctx: TrainContext,
    module: nn.Module,
    loss_fn: Callable[[Any], Any],
    batches: Callable[[int], Iterator[Any]],
    validate: Callable[[], float],
    stage: StageConfig,
    n_train: int,
    checkpoint: Path,
    save: Callable[[], None],
    on_epoch: EpochCallback | None,
) -> FitResult:
    """The fit of a stage that may run on several DDP ranks (the joint stages, the black box), and its end: the
    replicas must agree, the main rank writes the checkpoints and the output (`save`), every rank waits for it."""
    result = fit(
        module,
        module.parameters(),
        loss_fn,
        batches,
        validate,
        stage,
        steps_per_epoch=_steps(n_train, stage.batch_size),
        checkpoint=checkpoint,
        seed=ctx.config.seed,
        on_epoch=on_epoch,
        main_process=distributed.is_main(),
    )
    distributed.check_replicas(module)
    if distributed.is_main():
        save()
    distributed.barrier()
    return result


def project(ctx: TrainContext, name: str, merge: bool = True) -> pd.DataFrame:
    """Projection of one branch: writes projected.pt and provenance.parquet, returns the provenance.
    `merge=False` keeps near-duplicates apart: only to measure what the merge costs (benchmarks/train_accuracy.py)."""
    out, table = ctx.path(name, "projected.pt"), ctx.path(name, "provenance.parquet")
    if out.exists() and table.exists():
        return pd.read_parquet(table)
    branch = load_branch(ctx, name, "joint")
    offset = sum(
        ctx.config.model.branches[b].prototypes_per_class * len(ctx.labels.branch_indices(b))
        for b in BRANCHES[: BRANCHES.index(name)]
    )  # prototypes of the branches before this one
    provenance = project_prototypes(
        branch,
        ctx.splits["train"],
        ctx.labels.branch_indices(name),
        ctx.labels.codes,
        ctx.config.model.fs,
        ctx.config.eval_batch_size,
        ctx.device,
        offset,
        seed=ctx.config.seed,
    )
    # one case shown twice is one case: near-duplicates merge into the most faithful of them (ecgproto.train.projection)
    pairs = merge_near_duplicates(branch, provenance["fidelity"].to_numpy(), DUPLICATE_COS) if merge else []
    for duplicate, keeper in pairs:
        provenance.loc[duplicate, "merged_into"] = offset + keeper
    # how good each prototype is as a case (ecgproto.train.quality), measured on the projected branch
    quality = prototype_quality(
        branch,
        ctx.splits["train"],
        ctx.labels.branch_indices(name),
        ctx.config.model.fs,
        device=ctx.device,
        seed=ctx.config.seed,
    )
    at = quality["nearest_prototype"]
    quality["nearest_prototype"] = np.where(at >= 0, at + offset, -1)
    provenance = mark_shared_sources(pd.concat([provenance, quality], axis=1))
    atomic_write_parquet(provenance, table)
    persist.save_atomic(branch.cpu().state_dict(), out)
    return provenance


def train_last_layer(ctx: TrainContext, name: str, on_epoch: EpochCallback | None = None) -> FitResult:
    """Head only, on the projected branch's (cached) similarities: BCE + L1 on off-class weights."""
    cfg = ctx.config
    out, ckpt = ctx.path(name, "last_layer.pt"), ctx.path(name, "last_layer.ckpt")
    if (done := finished(ckpt, out)) is not None:
        return done
    branch = load_branch(ctx, name, "projected")
    idx = ctx.labels.branch_indices(name)
    _, s_train = _branch_outputs(ctx, branch, "train")
    _, s_val = _branch_outputs(ctx, branch, "val")
    head = branch.cpu().head  # the head trains on the cached similarities, on the CPU
    off = 1 - branch.class_identity().T
    pw = ctx.pos_weight[idx]
    x, y = torch.as_tensor(s_train), torch.as_tensor(ctx.splits["train"].labels[:, idx], dtype=torch.float32)
    y_val = ctx.splits["val"].labels[:, idx]

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return losses.bce(head(batch[0]), batch[1], pw) + cfg.loss.l1 * (head.weight.abs() * off).sum()

    def validate() -> float:
        with torch.no_grad():
            return macro_auroc(y_val, head(torch.as_tensor(s_val)).numpy())

    result = fit(
        head,
        head.parameters(),
        loss_fn,
        _tensor_batches(x, y, cfg.last_layer.batch_size, cfg.seed),
        validate,
        cfg.last_layer,
        steps_per_epoch=_steps(len(x), cfg.last_layer.batch_size),
        checkpoint=ckpt,
        seed=cfg.seed,
        on_epoch=on_epoch,
    )
    persist.save_atomic(branch.cpu().state_dict(), out)
    return result


def assemble(ctx: TrainContext) -> ECGProtoNet:
    """The full network from the three last-layer branches, with provenance and source records."""
    model = ECGProtoNet(ctx.config.model, ctx.labels)
    for name in BRANCHES:
        model.branches[name].load_state_dict(load_branch(ctx, name, "last_layer").state_dict(), strict=True)
    model.adopt_merges()  # the fusion's own-class mask follows the branches' merged near-duplicates
    provenance = pd.concat([pd.read_parquet(ctx.path(n, "provenance.parquet")) for n in BRANCHES], ignore_index=True)
    train = ctx.splits["train"]
    positions = np.unique(provenance["split_position"].to_numpy())
    provenance["source_index"] = np.searchsorted(positions, provenance["split_position"].to_numpy())
    model.source_signals = torch.as_tensor(train.signals(positions)).to(torch.float16)
    model.provenance = provenance.drop(columns=["split_position"]).to_dict(orient="records")
    return model


def train_fusion(ctx: TrainContext, on_epoch: EpochCallback | None = None) -> FitResult:
    """Fusion over the frozen branches' cached similarities; writes model.pt (the whole network)."""
    cfg = ctx.config
    out, ckpt = ctx.path("model.pt"), ctx.path("fusion", "fusion.ckpt")
    if (done := finished(ckpt, out)) is not None:
        return done
    model = assemble(ctx)
    sims = {}
    for split in ("train", "val"):
        sims[split] = np.concatenate([_branch_outputs(ctx, model.branches[n], split)[1] for n in BRANCHES], axis=1)
    fusion = model.fusion
    x = torch.as_tensor(sims["train"])
    y = torch.as_tensor(ctx.splits["train"].labels, dtype=torch.float32)
    y_val = ctx.splits["val"].labels
    teacher = teacher_scores(ctx)
    target = losses.soft_targets(y, None if teacher is None else torch.as_tensor(teacher), cfg.loss.distill)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        bce = losses.bce(fusion(batch[0]), batch[1], ctx.fusion_pos_weight)
        return bce + cfg.loss.fusion_l1 * fusion.off_class_l1()

    def validate() -> float:
        with torch.no_grad():
            return macro_auroc(y_val, fusion(torch.as_tensor(sims["val"])).numpy())

    fusion.constrain()
    result = fit(
        fusion,
        fusion.parameters(),
        loss_fn,
        _tensor_batches(x, target, cfg.fusion.batch_size, cfg.seed),
        validate,
        cfg.fusion,
        steps_per_epoch=_steps(len(x), cfg.fusion.batch_size),
        checkpoint=ckpt,
        seed=cfg.seed,
        on_epoch=on_epoch,
        after_step=fusion.constrain,
    )
    with torch.no_grad():
        model.thresholds.copy_(
            torch.as_tensor(
                best_f1_thresholds(y_val, torch.sigmoid(fusion(torch.as_tensor(sims["val"]))).numpy()),
                dtype=torch.float32,
            )
        )
    if model.fusion_heads is not None:
        train_fusion_heads(ctx, model, x, y, torch.as_tensor(sims["val"]), epochs=result.best_epoch + 1)
    calibrate(model, torch.as_tensor(sims["val"]), y_val, ctx.fusion_pos_weight)
    persist.save(model.cpu(), out)  # weights + model.json: rebuilt through the constructor, never unpickled
    return result


def train_fusion_heads(
    ctx: TrainContext, model: ECGProtoNet, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, epochs: int
) -> FitResult:
    """The bootstrap fusion heads (ECGProtoNet.uncertainty): each head weighs every training record by its own
    Poisson(1) draw, the bootstrap's resampling in weights, so all heads train together in one pass, for as many
    epochs as the main head's best (its schedule, so they cost no more than it did); the state kept is the one
    with the best mean validation BCE (their job is probabilities, not ranks)."""
    cfg = ctx.config
    heads = model.fusion_heads
    assert heads is not None
    g = torch.Generator().manual_seed(cfg.seed + 7)
    counts = torch.poisson(torch.ones(len(x), heads.n_heads), generator=g)  # (N, K)
    normalised, val = model.fusion.normalised(x), model.fusion.normalised(x_val)
    y_val = torch.as_tensor(ctx.splits["val"].labels, dtype=torch.float32)
    target = torch.cat([y, counts], dim=1)  # batches carry each record's K weights beside its labels

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, w = batch[1][:, : y.shape[1]], batch[1][:, y.shape[1] :].T  # (B, L), (K, B)
        z = heads(batch[0])  # (K, B, L)
        cell = nn.functional.binary_cross_entropy_with_logits(
            z, labels.expand_as(z), pos_weight=ctx.fusion_pos_weight, reduction="none"
        )
        bce = (cell.mean(dim=2) * w).sum() / w.sum().clamp(min=1)
        return bce * heads.n_heads + cfg.loss.fusion_l1 * heads.off_class_l1()  # each head its own BCE + L1

    def validate() -> float:
        with torch.no_grad():
            z = heads(val)
            return -float(nn.functional.binary_cross_entropy_with_logits(z, y_val.expand_as(z)))

    heads.constrain()
    return fit(
        heads,
        heads.parameters(),
        loss_fn,
        _tensor_batches(normalised, target, cfg.fusion.batch_size, cfg.seed + 1),
        validate,
        cfg.fusion.model_copy(update={"epochs": epochs, "patience": epochs}),
        steps_per_epoch=_steps(len(x), cfg.fusion.batch_size),
        checkpoint=ctx.path("fusion", "heads.ckpt"),
        seed=cfg.seed + 1,
        after_step=heads.constrain,
    )


@torch.no_grad()
def calibrate(model: ECGProtoNet, sims_val: torch.Tensor, y_val: np.ndarray, pos_weight: torch.Tensor) -> None:
    """Calibration of the fused model's probabilities (ranks unchanged): each label's logit offset undoes the
    training's positive-class weight (-log w), then one temperature fitted on the validation fold. Then the
    validation records' uncertainties at each percentile, which `uncertainty` places a new record among."""
    from ecgproto.evaluation.calibration import fit_temperature

    model.logit_offset.copy_(-torch.log(pos_weight.float()))
    model.temperature.fill_(
        fit_temperature(y_val, torch.sigmoid(model.fusion(sims_val)).numpy(), model.logit_offset.numpy())
    )
    u = model.uncertainty(sims_val)["uncertainty"].double().numpy()
    model.uncertainty_quantiles.copy_(torch.as_tensor(np.quantile(u, np.linspace(0, 1, 101)), dtype=torch.float32))


def load_model(ctx: TrainContext) -> ECGProtoNet:
    model = persist.load(ctx.path("model.pt"))
    assert isinstance(model, ECGProtoNet)
    return model


def check_registrable(ctx: TrainContext, metrics: dict[str, float]) -> None:
    """Refuse to hand on a model that did not train: a fit stage that ran no epoch or never got a finite validation
    score, or a test-fold macro-AUROC that is not a number (a registered version must be a model that learned)."""
    fits = [ctx.path(n, f"{s}.ckpt") for n in BRANCHES for s in ("joint", "last_layer")]
    for ckpt in [*fits, ctx.path("fusion", "fusion.ckpt")]:
        state = load_checkpoint(ckpt)
        best = float("nan") if state is None else float(state.get("best", float("nan")))
        if state is None or not state.get("history") or not 0 <= best <= 1:  # an AUROC, or never set
            raise UserError(
                f"{ckpt.parent.name}/{ckpt.stem}: the stage ran no epoch or never got a finite validation score - "
                "no model is registered; check the data and the configuration (epochs, learning rate) and train again"
            )
    value = metrics.get("fused.macro_auroc", float("nan"))
    if not np.isfinite(value):
        raise UserError(
            f"the test fold's macro-AUROC is {value} (no label has both classes in it?) - no model is registered; "
            "check the store's folds"
        )


def best_f1_thresholds(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per label, the validation threshold with the best F1 (0.5 for labels without positives)."""
    out = np.full(y.shape[1], 0.5)
    grid = np.linspace(0.02, 0.98, 49)
    for j in np.flatnonzero(y.any(axis=0)):
        pred = prob[:, j][:, None] >= grid[None, :]
        tp = (pred & (y[:, j][:, None] > 0)).sum(axis=0)
        f1 = 2 * tp / np.maximum(pred.sum(axis=0) + y[:, j].sum(), 1)
        out[j] = grid[int(np.argmax(f1))]
    return out


def train_baseline(ctx: TrainContext, on_epoch: EpochCallback | None = None) -> FitResult:
    """The black-box 1D ResNet on the same data and split (AdamW, one-cycle, time roll)."""
    cfg, b = ctx.config, ctx.config.baseline
    out, ckpt = ctx.path("baseline", "baseline.pt"), ctx.path("baseline", "baseline.ckpt")
    if (done := finished(ckpt, out)) is not None:
        return done
    torch.manual_seed(cfg.seed)
    net = ResNet1DClassifier(len(ctx.labels), b.widths, b.blocks).to(ctx.device)
    forward = distributed.wrap(net, ctx.device)  # DDP under torchrun, else the network itself
    part = distributed.rank_world()
    train, val = ctx.splits["train"], ctx.splits["val"]

    def loss_fn(batch) -> torch.Tensor:  # noqa: ANN001
        with ctx.autocast():
            logits = forward(batch.x.to(ctx.device))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch.y.to(ctx.device))

    def validate() -> float:
        return macro_auroc(val.labels, predict_baseline(ctx, net, "val"))

    def batches(epoch: int) -> Iterator:
        return train.batches(
            b.stage.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, time_roll=cfg.time_roll, part=part
        )

    return _fit_on_ranks(
        ctx, net, loss_fn, batches, validate, b.stage, len(train), ckpt, lambda: persist.save(net.cpu(), out), on_epoch
    )


def teacher_scores(ctx: TrainContext) -> np.ndarray | None:
    """The black box's scores (N, 71) of the training records, the soft targets of `loss.distill` (None when it is
    0): computed once from the trained baseline (eval mode, no time roll) and kept beside it."""
    if not ctx.config.baseline_teaches:
        return None
    if not ctx.config.baseline.enabled:
        raise ValueError(
            f"loss.distill = {ctx.config.loss.distill} learns from the black box, and the baseline is switched off: "
            "enable it or set loss.distill to 0 (TrainConfig.without_baseline does both)"
        )
    out = ctx.path("baseline", "train_scores.npy")
    if not out.exists():
        weights = ctx.path("baseline", "baseline.pt")
        if not weights.exists():
            raise FileNotFoundError(
                f"{weights}: loss.distill = {ctx.config.loss.distill} trains the branches and the fusion on the black "
                "box's scores, and the black box is not trained yet: run the baseline stage first (the train flow "
                "and benchmarks/train_accuracy.py do)"
            )
        net = persist.load(weights)
        buf = io.BytesIO()
        np.save(buf, predict_baseline(ctx, net, "train").astype(np.float32))
        atomic_write_bytes(out, buf.getvalue())
    scores = np.load(out)
    if scores.shape != (len(ctx.splits["train"]), len(ctx.labels)):
        raise ValueError(f"{out}: {scores.shape} scores for {len(ctx.splits['train'])} training records; delete it")
    return scores


@torch.no_grad()
def predict_baseline(ctx: TrainContext, net: nn.Module, split: str) -> np.ndarray:
    net.eval().to(ctx.device)
    out = []
    for batch in ctx.splits[split].batches(ctx.config.eval_batch_size):
        with ctx.autocast():
            out.append(torch.sigmoid(net(batch.x.to(ctx.device)).float()).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def predict(ctx: TrainContext, model: ECGProtoNet, split: str, uncertainty: bool = False) -> dict[str, np.ndarray]:
    """Scores of one split: fused probabilities (N, 71) and each branch's on its own labels; with `uncertainty`
    also what `ECGProtoNet.uncertainty` gives, as `uncertainty.<key>`."""
    model.eval().to(ctx.device)
    fused, per_branch = [], {n: [] for n in BRANCHES}
    extra: dict[str, list[torch.Tensor]] = {}
    for batch in ctx.splits[split].batches(ctx.config.eval_batch_size):
        x, beats = batch.x.to(ctx.device), batch.beats.to(ctx.device)
        sims = []
        with ctx.autocast():
            for n, branch in model.branches.items():
                logits, s = branch(x, beats)
                per_branch[n].append(torch.sigmoid(logits.float()).cpu())
                sims.append(s.float())
            fused.append(torch.sigmoid(model.fusion(torch.cat(sims, dim=1)).float()).cpu())
        if uncertainty:
            for k, v in model.uncertainty(torch.cat(sims, dim=1).float()).items():
                extra.setdefault(f"uncertainty.{k}", []).append(v.float().cpu())
    out = {"fused": torch.cat(fused).numpy()}
    out.update({n: torch.cat(v).numpy() for n, v in per_branch.items()})
    out.update({k: torch.cat(v).numpy() for k, v in extra.items()})
    return out


def explanation_examples(
    ctx: TrainContext, split: str = "test", preferred: tuple[str, ...] = (), n: int = 3, top_k: int = 3
) -> Iterator[tuple[str, Figure, dict[str, Any]]]:
    """(name, figure, explanation) for `n` labelled ECGs of `split`, each explained for its label (the case a
    reviewer opens first: why the model scores this label on an ECG that has it)."""
    from ecgproto.explain import example_cases, explain, explanation_figure

    model = load_model(ctx).cpu().eval()
    data = ctx.splits[split]
    local = tuple(ctx.labels.codes[i] for i in ctx.labels.branch_indices("morphology_2d_local"))
    for row, code in example_cases(data.labels, ctx.labels.codes, preferred, n, include_one_of=local):
        signal = data.signals(np.array([row]))[0]
        result = explain(model, signal, top_k=top_k, codes=[code])
        name = f"{data.record_ids[row]}_{code}"
        title = f"{split} ECG {data.record_ids[row]}, labelled {code}: the prototypes behind its score"
        yield name, explanation_figure(model, signal, result, title=title), result


def evaluate(ctx: TrainContext, split: str = "test") -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Whole-fold metrics with bootstrap CIs: the fused model, each branch, and the baseline."""
    cfg, y = ctx.config, ctx.splits[split].labels
    model = load_model(ctx)
    scores = predict(ctx, model, split, uncertainty=True)
    certainty = {k.split(".", 1)[1]: scores.pop(k) for k in list(scores) if k.startswith("uncertainty.")}
    codes = ctx.labels.codes
    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    table, head = evaluation_table(y, scores["fused"], codes, cfg.bootstrap, cfg.seed)
    tables["fused"] = table
    metrics.update({f"fused.{k}": v for k, v in head.items()})
    metrics["fused.n_records"] = float(len(y))
    for n in BRANCHES:
        idx = ctx.labels.branch_indices(n)
        t, h = evaluation_table(y[:, idx], scores[n], tuple(codes[i] for i in idx), cfg.bootstrap, cfg.seed)
        tables[n] = t
        metrics.update({f"{n}.{k}": v for k, v in h.items()})
        # The fused model on the same labels, so branch and fusion compare like for like.
        metrics[f"fused_on_{n}.macro_auroc"] = macro_auroc(y[:, idx], scores["fused"][:, idx])
    baseline_file = ctx.path("baseline", "baseline.pt")
    if cfg.baseline.enabled and baseline_file.exists():
        net = persist.load(baseline_file)
        baseline_scores = predict_baseline(ctx, net, split)
        t, h = evaluation_table(y, baseline_scores, codes, cfg.bootstrap, cfg.seed)
        tables["baseline"] = t
        metrics.update({f"baseline.{k}": v for k, v in h.items()})
        # Is the interpretable model worse than the black box on this fold? Paired over the same resamples.
        d, lo, hi = paired_bootstrap_difference(y, scores["fused"], baseline_scores, cfg.bootstrap, cfg.seed)
        metrics.update(
            {
                "fused_minus_baseline.macro_auroc": d,
                "fused_minus_baseline.macro_auroc_lo": lo,
                "fused_minus_baseline.macro_auroc_hi": hi,
            }
        )
    # calibration: a temperature per model fitted on the validation fold, the test fold's ECE before and after;
    # selective prediction: macro-AUROC on the records the fused model is most certain about
    # by three per-record uncertainty scores: the plain model's entropy, the calibrated bootstrap heads' total
    # uncertainty (ECGProtoNet.uncertainty), and its part from the heads' disagreement alone
    from ecgproto.evaluation.calibration import (
        COVERAGES,
        calibration_table,
        mean_ece,
        reliability_table,
        selective,
        uncertainty,
    )

    label_index = {"fused": np.arange(len(codes)), **{n: ctx.labels.branch_indices(n) for n in BRANCHES}}
    shift = -np.log(ctx.pos_weight.numpy().astype(np.float64))  # undo the training's positive-class weights
    offsets = {name: shift[cols] for name, cols in label_index.items()}
    offsets["fused"] = -np.log(ctx.fusion_pos_weight.numpy().astype(np.float64))
    calibration, temperatures = calibration_table(
        ctx.splits["val"].labels, predict(ctx, model, "val"), y, scores, label_index, offsets
    )
    tables["calibration"] = calibration
    tables["reliability"] = reliability_table(y, scores, temperatures, label_index, offsets)
    by = {"entropy (plain model)": uncertainty(scores["fused"])}
    if model.fusion_heads is not None:
        by["total (calibrated, bootstrap heads)"] = certainty["uncertainty"]
        by["epistemic (heads' disagreement)"] = certainty["epistemic"]
    tables["selective"] = selective(y, scores["fused"], COVERAGES, by)
    fused = calibration.set_index("model").loc["fused"]
    metrics.update(
        {
            "fused.temperature": float(fused["temperature"]),
            "fused.mean_ece": float(fused["test_mean_ece"]),
            "fused.mean_ece_scaled": float(fused["test_mean_ece_scaled"]),
            # the model's own calibrated probability (its stored temperature) and the heads' spread
            "fused.mean_ece_model": mean_ece(y, certainty["probability"]),
            "fused.mean_label_spread": float(certainty["spread"].mean()),
        }
    )
    for name, key in zip(by, ("plain", "total", "epistemic"), strict=False):
        sel = tables["selective"][tables["selective"]["score"] == name].set_index("coverage")["macro_auroc"]
        for c in (1.0, 0.9, 0.8):
            metrics[f"selective.{key}.macro_auroc_coverage_{int(round(c * 100))}"] = float(sel.loc[c])
    # the fused model's operating figures per label (prevalence, AUPRC, calibration, sensitivity/specificity
    # at 0.5): what an external validation (`ecgproto evaluate`) puts beside its own
    from ecgproto.evaluation.external import external_table

    tables["operating"] = external_table(
        y, scores["fused"], codes, ctx.labels.descriptions, n_boot=0, calibrated=certainty["probability"]
    )[0]
    # are the explanations faithful? masking the beats they point at vs as many random windows (ecgproto.faithfulness)
    if model.branches["morphology_2d_local"].beat:
        from ecgproto.faithfulness import faithfulness_summary, masking_faithfulness

        data = ctx.splits[split]
        every = np.arange(len(data))
        faithful = masking_faithfulness(
            model.cpu(),
            data.signals(every),
            data.beats(every),
            y,
            list(ctx.labels.branch_of),
            max_explanations=FAITHFULNESS_EXPLANATIONS,
            seed=cfg.seed,
        )
        tables["faithfulness"] = faithfulness_summary(faithful)
        for row in tables["faithfulness"].itertuples(index=False):
            for key in ("share_evidence_beats_random", "mean_drop_evidence", "mean_drop_random"):
                metrics[f"faithfulness.{row.branch}.{key}"] = float(getattr(row, key))
    side = tables["fused"][["code", "n_pos", "auroc", "auroc_lo", "auroc_hi"]].copy()
    if "baseline" in tables:
        side["baseline_auroc"] = tables["baseline"]["auroc"].to_numpy()
    side["branch"] = [ctx.labels.branch_of[i] for i in range(len(codes))]
    tables["side_by_side"] = side
    return metrics, tables
