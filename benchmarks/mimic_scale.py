"""A phenotype study at MIMIC-IV size, end to end: tiled cohort -> ingest -> score -> associate.

    python benchmarks/mimic_scale.py --root DIR                    # 160,000 subjects, ~800,000 ECGs
    python benchmarks/mimic_scale.py --root DIR --subjects 2000    # test-sized: ~10,000 ECGs, about a minute

The cohort is `ecgproto.data.demo.tiler` (500 Hz records hard-linked to a pool of distinct generated
ones, hosp tables with the demo's planted pattern -> diagnosis associations and one background code per
other phecode). Each stage runs in its own process, as a user runs `ecgproto ingest`, `score` and
`associate` one after the other, so each prints its own wall time, rate, peak RSS (of its largest
process) and the disk it added; a stage whose output exists under --root is reused (rerun the command
after a kill: ingest and scoring resume from their finished chunks and shards). The model is the demo
preset trained on 2,000 demo PTB-XL records (a couple of minutes, once per --root; `--model FILE` takes
a saved model instead). Last line: `mimic_scale_end_to_end_minutes=<minutes>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("cohort", "model", "ingest", "score", "associate")


def disk_kb(path: Path) -> int:
    """Blocks in use under `path` (hard links counted once, as `du` does)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else 0


def run_stage(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one stage in a child process; its result, wall time and peak RSS (largest process of the stage)."""
    cmd = [sys.executable, __file__, "--stage", name, "--root", str(args.root), "--subjects", str(args.subjects)]
    cmd += ["--pool", str(args.pool)] + (["--model", str(args.model)] if args.model else [])
    t0 = time.perf_counter()
    with open(args.root / f".{name}.out", "w+") as out:
        proc = subprocess.Popen(cmd, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (its largest process), not the max so far
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        lines = out.read().strip().splitlines()
    if proc.returncode or not lines:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); rerun to resume")
    return {**json.loads(lines[-1]), "wall_s": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


# --- the stages, each in its own process -----------------------------------------------------------


def stage_cohort(root: Path, subjects: int, pool: int) -> dict[str, object]:
    from ecgproto.data.demo.tiler import TiledCohortConfig, write_tiled_cohort

    truth = root / "cohort" / "ground_truth.json"
    config = TiledCohortConfig(n_subjects=subjects, pool=pool)
    if truth.exists() and json.loads(truth.read_text())["config"] == config.model_dump():
        t = json.loads(truth.read_text())
        return {"reused": True, "ecgs": t["ecgs"], "subjects": t["subjects"], "admissions": t["admissions"]}
    out = write_tiled_cohort(root / "cohort", config)
    return {"reused": False, **out}


def stage_model(root: Path, model_file: str | None) -> dict[str, object]:
    """The demo preset trained on 2,000 demo PTB-XL records (or --model), saved as root/model.pt."""
    import shutil

    from ecgproto.data.demo.generate import DemoConfig, generate_demo
    from ecgproto.data.ingest import IngestConfig, ingest
    from ecgproto.model import persist
    from ecgproto.train import stages
    from ecgproto.train.config import TrainConfig

    target = root / "model.pt"
    if model_file:
        persist.load(Path(model_file))  # refuses anything but an ecgproto model
        for suffix in (".pt", ".json"):  # the weights and the description beside them
            shutil.copyfile(Path(model_file).with_suffix(suffix), target.with_suffix(suffix))
        return {"model": str(model_file)}
    if target.exists() and target.with_suffix(".json").exists():
        return {"model": "reused"}
    demo = generate_demo(root / "train" / "demo", DemoConfig(n_ptbxl=2000, n_hr=0, n_mimic_subjects=0))
    store = ingest(demo.ptbxl, root / "train" / "store", IngestConfig(), progress=False).store
    cfg = TrainConfig.preset("demo")
    ctx = stages.TrainContext.open(store.path, cfg, root / "train" / "work")
    for step in stages.plan(cfg):
        stages.run_step(ctx, step)
    persist.save(stages.load_model(ctx), target)
    return {"model": "demo preset, trained here"}


def stage_ingest(root: Path) -> dict[str, object]:
    from ecgproto.data.ingest import IngestConfig, ingest
    from ecgproto.data.preprocess import PreprocessConfig

    before = disk_kb(root / "stores") if (root / "stores").exists() else 0
    config = IngestConfig(layout="mimic_ecg", preprocess=PreprocessConfig(dtype="float16"))
    result = ingest(root / "cohort" / "mimic-iv-ecg", root / "stores", config, progress=True)
    return {
        "store": str(result.store.path),
        "cache_hit": result.cache_hit,
        "records": result.n_records,
        "quarantined": result.n_quarantined,
        "seconds": result.seconds,
        "records_per_s": (result.n_records + result.n_quarantined) / result.seconds,
        "disk_mb": (disk_kb(root / "stores") - before) / 1024,
    }


def _store(root: Path):  # noqa: ANN202 - the only published store under root/stores
    from ecgproto.data.store import ArrayStore

    (path,) = [p for p in (root / "stores").iterdir() if p.name.startswith("mimic_ecg-")]
    return ArrayStore.open(path)


def stage_score(root: Path) -> dict[str, object]:
    from ecgproto.model import persist
    from ecgproto.phenotype.features import prototype_table
    from ecgproto.scoring import score_store

    store, model = _store(root), persist.load(root / "model.pt")
    t0 = time.perf_counter()
    acts = score_store(store, model, root / "activations", prototype_table(model), shard_size=16_384, progress=True)
    seconds = time.perf_counter() - t0
    return {
        "activations": str(acts.path),
        "ecgs": acts.info["n"],
        "seconds": seconds,
        "ecgs_per_s": acts.info["n"] / seconds,
        "disk_mb": disk_kb(root / "activations") / 1024,
    }


def stage_associate(root: Path) -> dict[str, object]:
    from ecgproto.data.demo.cohort import PLANTED
    from ecgproto.model import persist
    from ecgproto.phenotype.study import PhenotypeStudy, StudyConfig
    from ecgproto.scoring import ActivationStore

    store, model = _store(root), persist.load(root / "model.pt")
    (acts_path,) = list((root / "activations").glob("activations-*"))
    config = StudyConfig(predict=False)
    t0 = time.perf_counter()
    result = PhenotypeStudy(config).run(
        store,
        root / "cohort" / "mimic-iv" / "hosp",
        model,
        root / "cohort" / "mimic-iv-ecg" / "machine_measurements.csv",
        progress=False,
        activations=ActivationStore.open(acts_path),
    )
    seconds = time.perf_counter() - t0
    r = result.results
    same = result.status.untested.set_index("phecode")["same_cases_as"] if len(result.status.untested) else {}
    found = {}
    for dx in PLANTED:
        code = same.get(dx.phecode) or dx.phecode
        hits = r[(r["phecode"] == code) & (r["feature_id"] == f"prob:{dx.pattern}")]
        found[f"{dx.pattern}->{dx.phecode}"] = bool((hits["significant_bonf"] & (hits["beta"] > 0)).any())
    null = r[~r["phecode"].isin([dx.phecode for dx in PLANTED])]
    tests = int(r["p_value"].notna().sum())
    # the per-pair statsmodels Logit (intercept, age, sex, feature) on as many subjects, extrapolated to every test
    sys.path.insert(0, str(Path(__file__).parent))
    from associate import statsmodels_seconds_per_pair, synthetic

    age, male, fs, st = synthetic(len(result.cohort.units), 20, 20)
    per_pair = statsmodels_seconds_per_pair(age, male, fs, st)
    return {
        "seconds": seconds,
        "statsmodels_loop_hours": per_pair * tests / 3600,
        "speedup_vs_statsmodels_loop": per_pair * tests / seconds,
        "tests": tests,
        "phecodes_tested": int(r["phecode"].nunique()),
        "features": {k: int(v) for k, v in result.n_features.items()},
        "subjects": int(len(result.cohort.units)),
        "planted_found_class_prob": found,
        "null_share_p_below_0.05": float((null["p_value"] < 0.05).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="working folder (cohort, stores, model); reused")
    p.add_argument("--subjects", type=int, default=160_000)
    p.add_argument("--pool", type=int, default=2_000)
    p.add_argument("--model", help="a saved ecgproto model (model.pt) instead of training the demo preset")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.stage:
        fn = {
            "cohort": lambda: stage_cohort(args.root, args.subjects, args.pool),
            "model": lambda: stage_model(args.root, args.model),
            "ingest": lambda: stage_ingest(args.root),
            "score": lambda: stage_score(args.root),
            "associate": lambda: stage_associate(args.root),
        }[args.stage]
        print(json.dumps(fn()))
        return
    total = 0.0
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.subjects:,} subjects, pool {args.pool:,}, root {args.root}")
    for name in STAGES:
        out = run_stage(name, args)
        total += out["wall_s"] if name != "model" else 0.0
        print(f"[{name}] {json.dumps(out)}", flush=True)
    print(f"disk: cohort {disk_kb(args.root / 'cohort') / 1e6:.1f} GB (hard links once)")
    print(f"mimic_scale_end_to_end_minutes={total / 60:.1f}")


if __name__ == "__main__":
    main()
