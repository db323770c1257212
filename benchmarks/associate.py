"""Association engine at PheWAS scale vs a per-pair statsmodels loop.

A synthetic cohort: n admissions x m z-scored features (skewed like similarity scores) x J phecodes
with prevalences 0.5-20%, age and sex effects and a few planted associations. The engine (null fit
per phecode, score screen of every pair, exact refits of the hits) runs on the whole matrix; the
statsmodels loop (one Logit per pair) is timed on a sample of pairs and extrapolated.

    .venv/bin/python benchmarks/associate.py             # 10k x 1,037 x 100, then 100k x 1,037 x 1,000
    .venv/bin/python benchmarks/associate.py --quick     # the small size only

Last line: associate_speedup_vs_statsmodels_loop=<ratio at the largest size>.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm

from ecgproto.phenotype.engine import AssociationEngine, EngineConfig, FeatureSet
from ecgproto.phenotype.phecodes import PhecodeStatus


def synthetic(n: int, m: int, J: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, FeatureSet, PhecodeStatus]:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, n).astype(float)  # whole years, as MIMIC-IV gives them
    male = rng.random(n) < 0.5
    F = rng.standard_normal((n, m), dtype=np.float32)
    F[:, ::3] = np.log1p(rng.exponential(size=(n, len(range(0, m, 3))))).astype(np.float32)  # skewed columns
    F = (F - F.mean(0)) / F.std(0)
    prevalence = np.exp(rng.uniform(np.log(0.005), np.log(0.2), J))
    base = np.log(prevalence / (1 - prevalence))
    status = np.empty((n, J), dtype=np.int8)
    for lo in range(0, J, 100):
        j = np.arange(lo, min(lo + 100, J))
        eta = base[j] + 0.3 * ((age - 60) / 10)[:, None] + 0.2 * male[:, None]
        eta[:, :5] += 0.4 * F[:, j[:5] % m] if lo == 0 else 0.0  # a few planted pairs
        status[:, j] = rng.random((n, len(j)), dtype=np.float32) < 1 / (1 + np.exp(-eta))
    phecodes = pd.DataFrame(
        {
            "phecode": [f"{j}" for j in range(J)],
            "phecode_string": "synthetic",
            "phecode_category": "synthetic",
            "sex": "Both",
            "n_cases": (status == 1).sum(0),
            "n_controls": (status == 0).sum(0),
            "n_excluded": 0,
        }
    )
    features = pd.DataFrame({"feature_id": [f"P{i:04d}" for i in range(m)], "feature_label": "synthetic"})
    return age, male, FeatureSet("prototype", F, features), PhecodeStatus(status, phecodes, pd.DataFrame())


def statsmodels_seconds_per_pair(
    age: np.ndarray, male: np.ndarray, fs: FeatureSet, st: PhecodeStatus, pairs: int = 12, seed: int = 1
) -> float:
    rng = np.random.default_rng(seed)
    covariates = np.column_stack([np.ones(len(age)), (age - 60) / 10, male.astype(float)])
    start = time.perf_counter()
    for _ in range(pairs):
        i, j = rng.integers(fs.values.shape[1]), rng.integers(st.status.shape[1])
        y = (st.status[:, j] == 1).astype(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sm.Logit(y, np.column_stack([covariates, fs.values[:, i].astype(float)])).fit(disp=0)
    return (time.perf_counter() - start) / pairs


def run(n: int, m: int, J: int) -> float:
    age, male, fs, st = synthetic(n, m, J)
    start = time.perf_counter()
    engine = AssociationEngine(EngineConfig()).fit(age, male, st)
    fitted = time.perf_counter() - start
    table = engine.test(fs)
    seconds = time.perf_counter() - start
    per_pair = statsmodels_seconds_per_pair(age, male, fs, st)
    loop = per_pair * m * J
    refits = int((table["method"] != "score").sum())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"{n:>7,} x {m:,} x {J:,}: engine {seconds:6.1f} s (null fits {fitted:.1f} s, {refits:,} exact refits, "
        f"{m * J:,} tests); statsmodels loop {per_pair * 1e3:.1f} ms/pair -> {loop / 3600:.1f} h extrapolated; "
        f"speed-up {loop / seconds:,.0f}x; peak RSS {peak_gb:.2f} GB",
        flush=True,
    )
    return loop / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the 10,000 x 1,037 x 100 size")
    args = p.parse_args()
    sizes = [(10_000, 1037, 100)] + ([] if args.quick else [(100_000, 1037, 1000)])
    ratio = 0.0
    for n, m, J in sizes:
        ratio = run(n, m, J)
    print(f"associate_speedup_vs_statsmodels_loop={ratio:.0f}")


if __name__ == "__main__":
    main()
