"""Faithfulness of explanations on a trained model's test fold: masking the beats an explanation points at vs
masking as many random windows of the same leads (the baseline, in the same run).

    .venv/bin/python benchmarks/faithfulness.py WORK_DIR STORE [--max N]

WORK_DIR is a training's work folder (data/train/<key>/, holding model.pt), STORE the store it trained on. Every
(test ECG, positive label) explanation with local beat evidence is scored (`ecgproto.faithfulness`), or a seeded
sample of --max of them.

Last line: faithfulness_share_evidence_beats_random=<share over all explanations>.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ecgproto.data.labels import load_label_set
from ecgproto.data.store import ArrayStore
from ecgproto.faithfulness import faithfulness_summary, masking_faithfulness
from ecgproto.model import persist
from ecgproto.model.network import ECGProtoNet
from ecgproto.train.data import SplitData


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dir", type=Path)
    p.add_argument("store", type=Path)
    p.add_argument("--max", type=int, default=None, help="explanations scored (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = persist.load(args.work_dir / "model.pt")
    assert isinstance(model, ECGProtoNet)
    test = SplitData(ArrayStore.open(args.store), "test")
    every = np.arange(len(test))
    t0 = time.perf_counter()
    table = masking_faithfulness(
        model,
        test.signals(every),
        test.beats(every),
        test.labels,
        list(load_label_set().branch_of),
        max_explanations=args.max,
        seed=args.seed,
    )
    summary = faithfulness_summary(table)
    print(f"{len(table)} explanations of {len(test)} test ECGs in {time.perf_counter() - t0:.0f} s")
    for row in summary.itertuples(index=False):
        print(
            f"  {row.branch:20s} {row.explanations:5d} explanations: masking the evidence drops the label more "
            f"than random masks in {row.share_evidence_beats_random:.1%}; mean drop {row.mean_drop_evidence:.4f} "
            f"vs {row.mean_drop_random:.4f}"
        )
    overall = summary.set_index("branch").loc["all"]
    print(f"faithfulness_share_evidence_beats_random={overall['share_evidence_beats_random']:.3f}")


if __name__ == "__main__":
    main()
