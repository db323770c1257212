"""Training throughput of each prototype branch and of the black-box 1D ResNet, in one run.

    python benchmarks/train_throughput.py [--config small|reference] [--device cpu|cuda] [--steps 8] [--compile]

Each model takes the exact training step of its stage (the joint loss of `ecgproto.train.losses`
for a branch, BCE for the baseline; forward, backward, optimiser step) on batches of 12 x 1000
samples. On CUDA it also tries bf16 autocast, channels-last (2D branches) and torch.compile, and
keeps the fastest variant per model. From the measured rates it prints the time of one joint
epoch over a PTB-XL-size training split (folds 1-8, 17,418 records) and the upper bound of a full
training (every branch at the config's epoch limit; early stopping ends sooner).

Last line: `proto_vs_resnet1d_train_throughput=<ratio>`: ECGs/s of a full prototype-model training
step (three branches) over the baseline's, same batch, same device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from _common import PTBXL_TRAIN_RECORDS, default_device, set_threads
from _common import sync as _sync
from torch import nn

from ecgproto.data.beats import BeatConfig, Beats, grid_beats
from ecgproto.data.labels import BRANCHES, load_label_set
from ecgproto.model.baseline import ResNet1DClassifier
from ecgproto.model.network import build_branch
from ecgproto.train import losses
from ecgproto.train.config import PRESETS, TrainConfig


def _step_fn(
    name: str, cfg: TrainConfig, device: torch.device, batch: int, bf16: bool, channels_last: bool, compiled: bool
) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], int]:
    """One training step of `name` (a branch or 'baseline') and its number of labels."""
    labels = load_label_set()
    torch.manual_seed(cfg.seed)
    if name == "baseline":
        b = cfg.baseline
        model: nn.Module = ResNet1DClassifier(len(labels), b.widths, b.blocks).to(device)
        n_out = len(labels)
    else:
        branch = build_branch(name, cfg.model, labels).to(device)
        branch.head.weight.requires_grad_(False)
        model, n_out = branch, len(branch.classes)
        identity = branch.class_identity().to(device)
        jac = torch.eye(n_out, device=device)
        pw = torch.ones(n_out, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            # beat branches get their beats as a store holds them (one per second), not detected per step
            out = forward(x) if name == "baseline" else forward(x, grid)
        if name == "baseline":
            loss = nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        else:
            logits, sims = out
            loss = losses.joint_loss(logits, sims, branch.prototypes.prototypes, y, identity, jac, pw, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    beat_cfg = BeatConfig()
    grid = torch.as_tensor(
        Beats(grid_beats(cfg.model.n_samples, cfg.model.fs, beat_cfg), "grid").padded(beat_cfg.max_beats),
        dtype=torch.long,
        device=device,
    ).expand(batch, -1)
    model.train()
    return step, n_out


def throughput(name: str, cfg: TrainConfig, device: torch.device, batch: int, steps: int, **variant: bool) -> float:
    """ECGs per second of training steps after two warm-up steps (compilation excluded)."""
    step, n_out = _step_fn(name, cfg, device, batch, **variant)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.model.n_leads, cfg.model.n_samples, generator=g).to(device)
    y = (torch.rand(batch, n_out, generator=g) < 0.1).float().to(device)
    for _ in range(2):
        step(x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def variants(device: torch.device, name: str, try_compile: bool) -> dict[str, dict[str, bool]]:
    out = {"fp32": {"bf16": False, "channels_last": False, "compiled": False}}
    if device.type == "cuda":
        out["bf16"] = {"bf16": True, "channels_last": False, "compiled": False}
        if name in ("morphology_2d_local", "global_2d"):
            out["bf16+channels_last"] = {"bf16": True, "channels_last": True, "compiled": False}
    if try_compile:
        out["compile" if device.type == "cpu" else "bf16+compile"] = {
            "bf16": device.type == "cuda",
            "channels_last": False,
            "compiled": True,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=tuple(PRESETS), default="small")
    p.add_argument("--device", default=default_device())
    p.add_argument("--batch", type=int, help="default: the config's joint batch size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also try torch.compile (always tried on CUDA)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig.preset(args.config)
    batch = args.batch or cfg.joint.batch_size
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), config {args.config}, batch {batch}, {args.steps} timed steps per variant")

    best: dict[str, float] = {}
    for name in (*BRANCHES, "baseline"):
        rates = {}
        for label, v in variants(device, name, args.compile or device.type == "cuda").items():
            try:
                rates[label] = throughput(name, cfg, device, batch, args.steps, **v)
            except Exception as e:  # a variant the platform cannot run (e.g. no compiler for inductor)
                print(f"  {name}: {label} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        pick = max(rates, key=rates.__getitem__)
        best[name] = rates[pick]
        shown = ", ".join(f"{k} {r:,.0f}" for k, r in rates.items())
        print(f"{name:22s} train ECGs/s: {shown}  -> best {pick}")

    # The three branches train one after the other, each over the whole split.
    proto_rate = 1.0 / sum(1.0 / best[n] for n in BRANCHES)
    epoch_min = PTBXL_TRAIN_RECORDS / proto_rate / 60
    base_epoch_min = PTBXL_TRAIN_RECORDS / best["baseline"] / 60
    print(f"full prototype model (3 branches, joint stage): {proto_rate:,.0f} ECGs/s; baseline {best['baseline']:,.0f}")
    print(
        f"PTB-XL-size epoch ({PTBXL_TRAIN_RECORDS:,} records): prototype model {epoch_min:.1f} min "
        f"(upper bound for a full training at {cfg.joint.epochs} joint epochs per branch: "
        f"{epoch_min * cfg.joint.epochs / 60:.1f} h), baseline {base_epoch_min:.2f} min "
        f"({base_epoch_min * cfg.baseline.stage.epochs:.1f} min for {cfg.baseline.stage.epochs} epochs)"
    )

    print(f"proto_vs_resnet1d_train_throughput={proto_rate / best['baseline']:.3f}")


if __name__ == "__main__":
    main()
