"""Accuracy on real PTB-XL: the prototype model and the black box trained in the same run, on one fold.

    python benchmarks/train_accuracy.py PTBXL_DIR [--split test|val] [--seeds S1,S2] [--config small|reference]
        [--store STORE --work WORK_ROOT] [--unmerged]

Ingests an unpacked PTB-XL folder (the full PTB-XL, or the 1,250-record subset), trains the model
(the CPU configuration by default) and the black-box baseline through the real stages (folds 1-8 / 9
/ 10), and prints the whole-fold macro-AUROC with bootstrap CIs of the fused model, each branch and
the baseline, macro-AUPRC, the paired fused-minus-baseline CI and the wall time of every stage. Fold
10 (--split test, the default) is for final candidates; designs are chosen on fold 9 (--split val).
With --seeds it trains once per seed and also prints the mean and standard deviation over the seeds
of both figures and of their paired difference: a change is judged on several seeds.

--store/--work reuse an ingested store and a training work root (e.g. those of an `ecgproto train`
run with the same seed: its finished stages are reused, not retrained). --unmerged also measures what
the near-duplicate merge costs: from the same joint-trained branches it projects without merging,
retrains the last layers and the fusion, and prints the paired macro-AUROC difference merged minus
unmerged on the fold.

Last line: `real_test_macro_auroc[_ptbxl_full]_fused=... baseline=... paired_diff=... train_min=...`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import default_device, ingest_real, set_threads

from ecgproto.data.labels import BRANCHES
from ecgproto.data.store import ArrayStore
from ecgproto.evaluation.metrics import difference_text
from ecgproto.train.config import PRESETS, TrainConfig


def unmerged_difference(ctx: Any, split: str) -> tuple[float, float, float, dict[str, int]]:
    """Paired macro-AUROC difference (merged minus unmerged) on `split`, the unmerged model built from `ctx`'s
    joint-trained branches (and its black box) in a sibling work folder; and the merges per branch."""
    from ecgproto.evaluation.metrics import paired_bootstrap_difference
    from ecgproto.train import stages

    twin = stages.TrainContext(ctx.store, ctx.config, ctx.workdir.with_name(ctx.workdir.name + "-unmerged"))
    if (ctx.workdir / "baseline").exists() and not (twin.workdir / "baseline").exists():
        shutil.copytree(ctx.workdir / "baseline", twin.workdir / "baseline")
    merges = {}
    for name in BRANCHES:
        if not twin.path(name, "joint.pt").exists():
            shutil.copy2(ctx.path(name, "joint.pt"), twin.path(name, "joint.pt"))
        stages.project(twin, name, merge=False)
        stages.train_last_layer(twin, name)
        prov = pd.read_parquet(ctx.path(name, "provenance.parquet"))
        merges[name] = int((prov["merged_into"] != prov["prototype"]).sum())
    stages.train_fusion(twin)
    y = ctx.splits[split].labels
    merged = stages.predict(ctx, stages.load_model(ctx), split)["fused"]
    unmerged = stages.predict(twin, stages.load_model(twin), split)["fused"]
    d, lo, hi = paired_bootstrap_difference(y, merged, unmerged, ctx.config.bootstrap, ctx.config.seed)
    return d, lo, hi, merges


def real_data_accuracy(
    root: Path,
    scratch: Path,
    device: str,
    config: str = "small",
    seed: int | None = None,
    split: str = "test",
    store_dir: Path | None = None,
    work_root: Path | None = None,
    unmerged: bool = False,
) -> tuple[dict[str, float], ArrayStore, dict[str, float]]:
    """Ingest `root`, train the model and the baseline through the real stages, score `split` (fold 10 = test,
    fold 9 = val: designs are chosen on val); print every figure and the wall time of each stage."""
    from ecgproto.train import stages

    wall: dict[str, float] = {}

    def clock(key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        wall[key] = time.perf_counter() - t0
        print(f"[real]   {key:34s} {wall[key]:7.0f} s", flush=True)
        return out

    store = ArrayStore.open(store_dir) if store_dir else clock("ingest", ingest_real, root, scratch)
    wall.setdefault("ingest", 0.0)
    cfg = TrainConfig.preset(config)
    cfg.device = device
    if seed is not None:
        cfg.seed = seed
    ctx = stages.TrainContext.open(store.path, cfg, work_root or scratch / "work")
    epochs: dict[str, list[int]] = {"joint": [], "last_layer": [], "fusion": [], "baseline": []}
    for step in stages.plan(cfg):
        out = clock(step.key, stages.run_step, ctx, step)
        if step.stage in epochs:
            epochs[step.stage].append(len(out.history))
    proto_s = sum(v for k, v in wall.items() if k not in ("ingest", "baseline"))
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
    # calibration, selective prediction and prototype quality (ecgproto.evaluation.calibration, ecgproto.train.quality)
    for row in tables["calibration"].itertuples(index=False):
        print(
            f"[real]   calibration {row.model:20s} T {row.temperature:.2f}, {split} mean ECE "
            f"{row.test_mean_ece:.4f} -> {row.test_mean_ece_scaled:.4f} temperature-scaled"
        )
    sel = tables["selective"]
    for score, g in sel.groupby("score", sort=False):
        at = g.set_index("coverage")["macro_auroc"]
        print(
            f"[real]   selective, {score:36s} macro-AUROC at 100/90/80% coverage "
            f"{at.loc[1.0]:.4f} / {at.loc[0.9]:.4f} / {at.loc[0.8]:.4f}"
        )
    spread = metrics["fused.mean_label_spread"]
    print(f"[real]   mean spread of a label's probability over the fusion heads {spread:.4f}")
    from ecgproto.train.quality import quality_summary

    provenance = pd.concat([pd.read_parquet(ctx.path(b, "provenance.parquet")) for b in BRANCHES], ignore_index=True)
    for row in quality_summary(provenance).itertuples(index=False):
        print(
            f"[real]   quality {row.branch:20s} {row.prototypes} prototypes: purity {row.purity_mean:.2f} "
            f"(p10 {row.purity_p10:.2f}; by chance {row.class_share_mean:.3f}), "
            f"consistency {row.consistency_mean:.2f}, stability {row.stability_mean:.3f} "
            f"(p10 {row.stability_p10:.3f}), near-duplicates {row.duplicates}"
        )
    if unmerged:
        d, lo, hi, merges = clock("unmerged twin", unmerged_difference, ctx, split)
        print(
            f"[real]   merged - unmerged         {split} macro-AUROC {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"(paired bootstrap; prototypes merged away: {merges})"
        )
        metrics.update({"merged_minus_unmerged": d, "merged_minus_unmerged_lo": lo, "merged_minus_unmerged_hi": hi})
    metrics["prototype_model_min"], metrics["baseline_min"] = proto_s / 60, wall["baseline"] / 60
    return metrics, ctx.store, {k: float(np.median(v)) for k, v in epochs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("real", type=Path, help="an unpacked PTB-XL folder (the full PTB-XL or the 1,250-record subset)")
    p.add_argument("--config", choices=tuple(PRESETS), default="small")
    p.add_argument("--device", default=default_device())
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the fold scored (test = fold 10, final candidates only; val = fold 9, where designs are chosen)",
    )
    p.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="comma-separated training seeds (default: the config's); each is a full training",
    )
    p.add_argument("--store", type=Path, default=None, help="an ingested store of PTB_DIR to reuse (skips ingest)")
    p.add_argument("--work", type=Path, default=None, help="a training work root to reuse (finished stages are kept)")
    p.add_argument("--unmerged", action="store_true", help="also measure the near-duplicate merge's cost (see above)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    set_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="ecgproto-bench-accuracy-"))
    try:
        runs = [
            real_data_accuracy(
                args.real.resolve(),
                scratch,
                args.device,
                args.config,
                seed,
                args.split,
                args.store,
                args.work,
                args.unmerged,
            )
            for seed in (args.seeds or [None])
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    store = runs[0][1]
    fused = np.array([r[0]["fused.macro_auroc"] for r in runs])
    base = np.array([r[0]["baseline.macro_auroc"] for r in runs])
    first = runs[0][0]
    name = f"real_{args.split}_macro_auroc" + ("_ptbxl_full" if len(store.manifest) > 20_000 else "")
    line = (
        f"{name}_fused={fused.mean():.4f} baseline={base.mean():.4f} "
        f"paired_diff={difference_text(first).replace(' ', '')} "
        f"train_min={first['prototype_model_min'] + first['baseline_min']:.1f}"
    )
    if len(runs) > 1:
        sd = {k: float(v.std(ddof=1)) for k, v in (("fused", fused), ("baseline", base), ("diff", fused - base))}
        print(
            f"[real] over {len(runs)} seeds, mean +- sd: fused {fused.mean():.4f} +- {sd['fused']:.4f}, "
            f"baseline {base.mean():.4f} +- {sd['baseline']:.4f}, fused - baseline "
            f"{(fused - base).mean():+.4f} +- {sd['diff']:.4f}"
        )
        line += f" seeds={len(runs)}"
    print(line)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
