"""One DDP rank of a training stage, the module torchrun starts (see ecgproto.train.distributed.launch).

Apart from `distributed` so the stages (which use its helpers) and the torchrun entry point (which runs
the stages) do not import each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecgproto.train import stages
from ecgproto.train.config import TrainConfig
from ecgproto.train.distributed import process_group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one DDP rank of a training stage (started by torchrun)")
    p.add_argument("--stage", choices=("joint", "baseline"), required=True)
    p.add_argument("--branch")
    p.add_argument("--store", required=True)
    p.add_argument("--work-root", required=True)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    args = p.parse_args(argv)
    config = TrainConfig.model_validate(json.loads(args.config))
    with process_group(config.device) as device:
        config = config.model_copy(update={"device": str(device)})
        ctx = stages.TrainContext.open(Path(args.store), config, Path(args.work_root))
        if args.stage == "joint":
            stages.train_joint(ctx, args.branch)
        else:
            stages.train_baseline(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
