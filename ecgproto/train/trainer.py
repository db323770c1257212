"""One optimisation loop for every stage: seeded epochs, whole-fold validation, early stopping,
and a checkpoint after each epoch so a killed stage resumes where it stopped.

A checkpoint holds the model, optimiser and scheduler states, the best state so far and the
history. Epoch randomness is derived from (seed, epoch), so a resumed run equals an unbroken one.
(A moving average of the weights was tried and retired: docs/experiments.md.)
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
            step_losses.append(loss.detach())
        model.eval()
        score = validate()
        improved = score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
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
                },
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
        if stopped:
            break
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best, history, resumed_from)
