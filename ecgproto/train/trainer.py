"""One optimisation loop for every stage: seeded epochs, whole-fold validation, early stopping,
and a checkpoint after each epoch so a killed stage resumes where it stopped.

A checkpoint holds the model, optimiser and scheduler states, the best state so far and the
history. Epoch randomness is derived from (seed, epoch), so a resumed run equals an unbroken one.

With `StageConfig.ema_epochs` the loop also keeps an exponential moving average of the weights (and
batch-norm statistics), in the checkpoint too; validation scores the average, which is what the
best state and the stage's output are. A single epoch's weights carry that epoch's last steps'
noise, so choosing the best epoch on a noisy validation fold chooses partly on noise; the average
is smoother.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecgproto.model.persist import load_weights, save_atomic
from ecgproto.train.config import StageConfig

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A stage checkpoint (tensors and plain values only; anything else is refused unread)."""
    return load_weights(path) if path.exists() else None


def _schedule(
    opt: torch.optim.Optimizer, cfg: StageConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose cosine, onecycle or constant")


class WeightAverage:
    """Exponential moving average of a model's floating-point state (parameters and buffers) over optimiser
    steps, with the usual warm-up (decay min(d, (1 + t) / (10 + t)) at step t), so early steps are not
    dominated by the initial weights. Integer buffers (batch-norm step counts) are copied."""

    def __init__(self, model: nn.Module, decay: float, state: dict[str, Any] | None = None) -> None:
        self.decay = decay
        live = model.state_dict()
        self.steps = int(state["steps"]) if state is not None else 0
        source = state["average"] if state is not None else live
        self.average = {k: source[k].detach().to(live[k].device, copy=True) for k in live}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in model.state_dict().items():
            a = self.average[k]
            if a.is_floating_point():
                a.lerp_(v.detach(), 1.0 - d)
            else:
                a.copy_(v)
        self.steps += 1

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps, "average": self.average}


def fit(
    model: nn.Module,
    parameters: Iterable[nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]],
    batches: Callable[[int], Iterator[Any]],
    validate: Callable[[], float],
    cfg: StageConfig,
    *,
    steps_per_epoch: int,
    checkpoint: Path,
    seed: int,
    on_epoch: EpochCallback | None = None,
    after_step: Callable[[], None] | None = None,
    main_process: bool = True,
) -> FitResult:
    """Train `parameters` of `model`; keep the state with the best validation score (higher is better).
    `loss_fn` returns the loss, or (loss, its named terms): each term's epoch mean joins the history as
    `train_loss.<name>`.

    Under DDP every rank calls this with its share of each batch; only the main process writes the
    checkpoint (every rank resumes from it)."""
    params = [p for p in parameters if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg, steps_per_epoch)
    state = load_checkpoint(checkpoint)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best, best_epoch, bad = state["epoch"] + 1, state["best"], state["best_epoch"], state["bad"]
        best_state, history = state["best_state"], state["history"]
    else:
        start, best, best_epoch, bad, history = 0, -math.inf, -1, 0, []
        best_state = copy.deepcopy(model.state_dict())
    average = None
    if cfg.ema_epochs > 0:  # a horizon in epochs: the same smoothing on a small cohort and on the full PTB-XL
        decay = max(0.0, 1.0 - 1.0 / (cfg.ema_epochs * steps_per_epoch))
        average = WeightAverage(model, decay, state.get("ema") if state is not None else None)
    resumed_from = start
    if cfg.epochs == 0 or (state is not None and state.get("stopped")):
        model.load_state_dict(best_state)
        return FitResult(best_epoch, best if best > -math.inf else validate(), history, resumed_from)
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 1009 + epoch)  # dropout and anything else drawn from torch's RNG
        model.train()
        step_losses: list[torch.Tensor] = []  # kept on the device: no host sync per step
        step_parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches(epoch):
            loss = loss_fn(batch)
            if isinstance(loss, tuple):
                loss, parts = loss
                for k, v in parts.items():
                    step_parts.setdefault(k, []).append(v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            if average is not None:
                average.update(model)
            step_losses.append(loss.detach())
        model.eval()
        live = None
        if average is not None:  # score (and keep) the average; training goes on from the live weights
            live = copy.deepcopy(model.state_dict())
            model.load_state_dict(average.average)
        score = validate()
        improved = score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        if live is not None:
            model.load_state_dict(live)
        stopped = bad >= cfg.patience or epoch == cfg.epochs - 1
        train_loss = float(torch.stack(step_losses).double().mean()) if step_losses else 0.0
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "val_macro_auroc": score, "lr": opt.param_groups[0]["lr"]}
            | {f"train_loss.{k}": float(torch.stack(v).double().mean()) for k, v in step_parts.items()}
        )
        if main_process:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "best_epoch": best_epoch,
                    "bad": bad,
                    "best_state": best_state,
                    "history": history,
                    "stopped": stopped,
                }
                | ({"ema": average.state()} if average is not None else {}),
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
        if stopped:
            break
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best, history, resumed_from)
