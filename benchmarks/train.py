"""Training throughput of each prototype branch and of the black-box 1D ResNet, in one run.

    python benchmarks/train.py [--config small|reference] [--device cpu|cuda] [--steps 8] [--compile]
                               [--real PATH]

Each model takes the exact training step of its stage (the joint loss of `ecgproto.train.losses`
for a branch, BCE for the baseline; forward, backward, optimiser step) on batches of 12 x 1000
samples. On CUDA it also tries bf16 autocast, channels-last (2D branches) and torch.compile, and
keeps the fastest variant per model. From the measured rates it prints the time of one joint
epoch over a PTB-XL-size training split (folds 1-8, 17,418 records) and the upper bound of a full
training (every branch at the config's epoch limit; early stopping ends sooner).

With --real (an unpacked PTB-XL folder: the full PTB-XL, or the 1,250-record subset) it also ingests
it, trains the model (--real-config, small by default: the CPU configuration) and the black-box
baseline in the same run through the real stages (folds 1-8 / 9 / 10), and prints the whole-fold
macro-AUROC with bootstrap CIs of the fused model, each branch and the baseline, macro-AUPRC, the
paired fused-minus-baseline CI and the wall time of every stage. Fold 10 (--split test, the default)
is for final candidates; choose designs on fold 9 (--split val). The full PTB-XL on 2 CPU cores:

    python benchmarks/train.py --real PTBXL_DIR --skip-throughput --threads 2

ends with `real_test_macro_auroc_ptbxl_full_fused=... baseline=... paired_diff=... train_min=...`.
With --seeds S1,S2,..
it trains once per seed and also prints the mean and standard deviation over the seeds of both
figures and of their paired difference: on a 125-record test fold one seed moves the prototype
model by a few hundredths, so a change is judged on several.

With --real and --ptbxl-size it also tiles the ingested records to PTB-XL's split sizes
(17,418 / 2,183 / 2,198 records) and runs every stage of the reference config for --epochs epochs
(default 1) through the real stage code (memmap reads, validation each epoch, projection over the
whole training split, evaluation with bootstrap CIs), timing each; from those it prints the time
of a full training on one device at the config's epoch limits (the upper bound) and at the
median epochs early stopping took on the real subset.

Last line: `proto_vs_resnet1d_train_throughput=<ratio>`: ECGs/s of a full prototype-model training
step (three branches) over the baseline's, same batch, same device; with --real and
--skip-throughput the accuracy line above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ecgproto.data.beats import BeatConfig, Beats, grid_beats
from ecgproto.data.labels import BRANCHES, load_label_set
from ecgproto.data.store import ArrayStore
from ecgproto.model.baseline import ResNet1DClassifier
from ecgproto.model.network import build_branch
from ecgproto.train import losses
from ecgproto.train.config import TrainConfig
from ecgproto.train.metrics import difference_text

PTBXL_TRAIN_RECORDS = 17_418


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


PTBXL_SPLITS = {"train": PTBXL_TRAIN_RECORDS, "val": 2_183, "test": 2_198}  # folds 1-8 / 9 / 10


def tile_store(src: ArrayStore, dst: Path, sizes: dict[str, int]) -> ArrayStore:
    """A store of `sizes` records per split made by repeating `src`'s records of that split."""
    parts = []
    for split, n in sizes.items():
        rows = src.manifest[src.manifest["split"] == split]
        copy = np.arange(n) // len(rows)
        part = rows.iloc[np.arange(n) % len(rows)].copy()
        part["record_id"] = part["record_id"].astype(str) + "~" + copy.astype(str)
        parts.append(part)
    m = pd.concat(parts, ignore_index=True)
    dst.mkdir(parents=True)
    sig = np.lib.format.open_memmap(
        dst / "signals.npy", mode="w+", dtype=src.signals.dtype, shape=(len(m), *src.signals.shape[1:])
    )
    assert src.labels is not None
    lab = np.empty((len(m), src.labels.shape[1]), dtype=src.labels.dtype)
    for i in range(0, len(m), 4096):
        rows = m["row"].to_numpy()[i : i + 4096]
        sig[i : i + len(rows)] = src.signals[rows]
        lab[i : i + len(rows)] = src.labels[rows]
    sig.flush()
    np.save(dst / "labels.npy", lab)
    np.save(dst / "beats.npy", np.asarray(src.beats)[m["row"].to_numpy()])
    m["row"] = np.arange(len(m))
    m.to_parquet(dst / "manifest.parquet")
    src.quarantine.to_parquet(dst / "quarantine.parquet")
    info = {**src.info, "cache_key": f"{src.key}-tiled-{len(m)}", "n_records": len(m), "shape": list(sig.shape)}
    (dst / "store.json").write_text(json.dumps(info))
    return ArrayStore.open(dst)


def ptbxl_size_timing(store: ArrayStore, scratch: Path, device: str, epochs: int, typical: dict[str, float]) -> float:
    """Seconds of a full reference training at PTB-XL size, extrapolated from timed stage epochs."""
    from ecgproto.train import stages

    big = tile_store(store, scratch / "ptbxl-size", PTBXL_SPLITS)
    cfg = TrainConfig()
    cfg.device = device
    limits = {
        "joint": cfg.joint.epochs,
        "last_layer": cfg.last_layer.epochs,
        "fusion": cfg.fusion.epochs,
        "baseline": cfg.baseline.stage.epochs,
    }
    for stage in (cfg.joint, cfg.last_layer, cfg.fusion, cfg.baseline.stage):
        stage.epochs = epochs
    ctx = stages.TrainContext.open(big.path, cfg, scratch / "work-ptbxl-size")
    _ = ctx.splits, ctx.pos_weight, ctx.jaccard
    timed: dict[str, float] = {}

    def clock(key: str, fn: Callable[..., object], *args: object) -> None:
        _sync(ctx.device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(ctx.device)
        timed[key] = time.perf_counter() - t0

    for name in BRANCHES:
        clock(f"joint.{name}", stages.train_joint, ctx, name)
        clock(f"project.{name}", stages.project, ctx, name)
        clock(f"last_layer.{name}", stages.train_last_layer, ctx, name)
    clock("fusion", stages.train_fusion, ctx)
    clock("baseline", stages.train_baseline, ctx)
    clock("evaluate", stages.evaluate, ctx, "test")
    n = {s: len(ctx.splits[s]) for s in ("train", "val", "test")}
    print(
        f"[ptbxl-size] {n['train']:,}/{n['val']:,}/{n['test']:,} records, reference config, {epochs} epoch(s) "
        f"per stage on {ctx.device}:"
    )
    for key, sec in timed.items():
        print(f"[ptbxl-size]   {key:32s} {sec:8.1f} s")

    def total(epochs_of: dict[str, float]) -> float:
        per_epoch = {k: timed[k] / epochs for k in timed if not k.startswith(("project", "evaluate"))}
        t = sum(timed[k] for k in timed if k.startswith(("project", "evaluate")))
        for k, sec in per_epoch.items():
            t += sec * epochs_of[k.split(".")[0]]
        return t

    upper = total({k: float(v) for k, v in limits.items()})
    print(f"[ptbxl-size] full training at the epoch limits ({limits}): {upper / 3600:.2f} h (upper bound)")
    if typical:
        est = total({k: typical.get(k, float(limits[k])) for k in limits})
        shown = {k: round(v, 1) for k, v in typical.items()}
        print(
            f"[ptbxl-size] full training at the epochs early stopping took on the real subset ({shown}): "
            f"{est / 60:.1f} min"
        )
        return est
    return upper


def real_data_accuracy(
    root: Path, scratch: Path, device: str, config: str = "small", seed: int | None = None, split: str = "test"
) -> tuple[dict[str, float], ArrayStore, dict[str, float]]:
    """Ingest `root`, train the model and the baseline through the real stages, score `split` (fold 10 = test,
    fold 9 = val: designs are chosen on val); print every figure and the wall time of each stage."""
    from ecgproto.data.ingest import IngestConfig, ingest
    from ecgproto.train import stages

    wall: dict[str, float] = {}

    def clock(key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        wall[key] = time.perf_counter() - t0
        print(f"[real]   {key:34s} {wall[key]:7.0f} s", flush=True)
        return out

    store = clock(
        "ingest", ingest, root, scratch / "store", IngestConfig(workers=os.cpu_count() or 2), progress=False
    ).store
    cfg = TrainConfig.small() if config == "small" else TrainConfig()
    cfg.device = device
    if seed is not None:
        cfg.seed = seed
    ctx = stages.TrainContext.open(store.path, cfg, scratch / "work")
    epochs: dict[str, list[int]] = {"joint": [], "last_layer": [], "fusion": [], "baseline": []}
    for name in BRANCHES:
        epochs["joint"].append(len(clock(f"joint {name}", stages.train_joint, ctx, name).history))
        clock(f"projection {name}", stages.project, ctx, name)
        epochs["last_layer"].append(len(clock(f"last layer {name}", stages.train_last_layer, ctx, name).history))
    epochs["fusion"].append(len(clock("fusion", stages.train_fusion, ctx).history))
    proto_s = sum(v for k, v in wall.items() if k != "ingest")
    epochs["baseline"].append(len(clock("baseline", stages.train_baseline, ctx).history))
    metrics, tables = clock(f"evaluate ({split})", stages.evaluate, ctx, split)
    n = {s: len(ctx.splits[s]) for s in ("train", "val", "test")}
    fold = {"test": "fold 10", "val": "fold 9"}[split]
    print(
        f"[real] {root.name}: {n['train']}/{n['val']}/{n['test']} records (folds 1-8/9/10), {config} config "
        f"on {ctx.device}, seed {cfg.seed}; prototype model trained in {proto_s / 60:.1f} min, baseline in "
        f"{wall['baseline'] / 60:.1f} min; epochs run {epochs}; scored on {split} ({fold})"
    )
    for key in ("fused", "baseline", *BRANCHES):
        print(
            f"[real]   {key:22s} {split} macro-AUROC {metrics[f'{key}.macro_auroc']:.4f} "
            f"[{metrics[f'{key}.macro_auroc_lo']:.4f}, {metrics[f'{key}.macro_auroc_hi']:.4f}], "
            f"macro-AUPRC {metrics[f'{key}.macro_auprc']:.4f}"
        )
    print(f"[real]   fused - baseline         {difference_text(metrics)} (paired bootstrap over the {split} records)")
    by_branch = tables["side_by_side"].groupby("branch")[["auroc", "baseline_auroc"]].mean()
    print(
        "[real]   fused vs baseline, mean AUROC over each branch's labels: "
        + "; ".join(f"{b} {r.auroc:.3f} vs {r.baseline_auroc:.3f}" for b, r in by_branch.iterrows())
    )
    metrics["prototype_model_min"], metrics["baseline_min"] = proto_s / 60, wall["baseline"] / 60
    return metrics, ctx.store, {k: float(np.median(v)) for k, v in epochs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("small", "reference"), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="default: the config's joint batch size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also try torch.compile (always tried on CUDA)")
    p.add_argument("--real", type=Path, help="an unpacked PTB-XL folder (e.g. the shared 1,250-record subset)")
    p.add_argument("--real-config", choices=("small", "reference"), default="small")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="with --real: the fold scored (test = fold 10; val = fold 9, where designs are chosen)",
    )
    p.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="with --real: comma-separated training seeds (default: the config's); each is a full training",
    )
    p.add_argument(
        "--ptbxl-size", action="store_true", help="with --real: time every stage of the reference config at PTB-XL size"
    )
    p.add_argument("--epochs", type=int, default=1, help="epochs per stage timed by --ptbxl-size")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig.small() if args.config == "small" else TrainConfig()
    batch = args.batch or cfg.joint.batch_size
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), config {args.config}, batch {batch}, {args.steps} timed steps per variant")

    best: dict[str, float] = {}
    for name in (*BRANCHES, "baseline") if not args.skip_throughput else ():
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

    if best:
        # The three branches train one after the other, each over the whole split.
        proto_rate = 1.0 / sum(1.0 / best[n] for n in BRANCHES)
        epoch_min = PTBXL_TRAIN_RECORDS / proto_rate / 60
        base_epoch_min = PTBXL_TRAIN_RECORDS / best["baseline"] / 60
        print(
            f"full prototype model (3 branches, joint stage): {proto_rate:,.0f} ECGs/s; "
            f"baseline {best['baseline']:,.0f}"
        )
        print(
            f"PTB-XL-size epoch ({PTBXL_TRAIN_RECORDS:,} records): prototype model {epoch_min:.1f} min "
            f"(upper bound for a full training at {cfg.joint.epochs} joint epochs per branch: "
            f"{epoch_min * cfg.joint.epochs / 60:.1f} h), baseline {base_epoch_min:.2f} min "
            f"({base_epoch_min * cfg.baseline.stage.epochs:.1f} min for {cfg.baseline.stage.epochs} epochs)"
        )

    last = f"proto_vs_resnet1d_train_throughput={proto_rate / best['baseline']:.3f}" if best else ""
    if args.real:
        scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-train-"))
        try:
            runs = [
                real_data_accuracy(args.real.resolve(), scratch, args.device, args.real_config, seed, args.split)
                for seed in (args.seeds or [None])
            ]
            _, store, typical = runs[0]  # the first seed's store and epochs serve --ptbxl-size
            fused = np.array([r[0]["fused.macro_auroc"] for r in runs])
            base = np.array([r[0]["baseline.macro_auroc"] for r in runs])
            first = runs[0][0]
            name = f"real_{args.split}_macro_auroc" + ("_ptbxl_full" if len(store.manifest) > 20_000 else "")
            real = (
                f"{name}_fused={fused.mean():.4f} baseline={base.mean():.4f} "
                f"paired_diff={difference_text(first).replace(' ', '')} "
                f"train_min={first['prototype_model_min'] + first['baseline_min']:.1f}"
            )
            if len(runs) > 1:
                sd = {
                    k: float(v.std(ddof=1)) for k, v in (("fused", fused), ("baseline", base), ("diff", fused - base))
                }
                print(
                    f"[real] over {len(runs)} seeds, mean +- sd: fused {fused.mean():.4f} +- {sd['fused']:.4f}, "
                    f"baseline {base.mean():.4f} +- {sd['baseline']:.4f}, fused - baseline "
                    f"{(fused - base).mean():+.4f} +- {sd['diff']:.4f}"
                )
                real += f" seeds={len(runs)}"
            if last or args.ptbxl_size:
                print(real)
            else:  # accuracy alone (--skip-throughput): it is the headline
                last = real
            if args.ptbxl_size:
                typical = typical if args.real_config == "reference" else {}
                sec = ptbxl_size_timing(store, scratch, args.device, args.epochs, typical)
                last = last or f"ptbxl_size_full_training_min={sec / 60:.1f}"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(last or "proto_vs_resnet1d_train_throughput=nan")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
