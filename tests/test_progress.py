"""Progress a user watches: a line per epoch with the time left; counted progress as plain lines off a terminal."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ecgproto.progress import CountProgress, EpochProgress


def test_a_progress_line_per_epoch_with_the_best_score_and_the_time_left() -> None:
    out, now = io.StringIO(), iter([0.0, 60.0, 120.0, 121.0, 122.0, 123.0])
    show = EpochProgress("train rhythm_1d/joint", 30, out, clock=lambda: next(now))
    show(0, {"train_loss": 0.5, "val_macro_auroc": 0.81})
    show(1, {"train_loss": 0.4, "val_macro_auroc": 0.79})  # 60 s later: shown
    show(2, {"train_loss": 0.3, "val_macro_auroc": 0.80})  # 1 s later, no new best: quiet
    show(3, {"train_loss": 0.3, "val_macro_auroc": 0.83})  # a new best: shown
    first, second, third = out.getvalue().splitlines()
    assert first.startswith("train rhythm_1d/joint  epoch 1/30  loss 0.500  val macro-AUROC 0.810 (best 0.810)")
    assert first.endswith("~29 min left at most")
    assert "(best 0.810)" in second and second.endswith("~28 min left at most")
    assert third.startswith("train rhythm_1d/joint  epoch 4/30") and "(best 0.830)" in third


def test_counted_progress_shows_the_first_batch_then_every_10_s_and_the_end() -> None:
    out, now = io.StringIO(), iter([0.0, 2.0, 5.0, 14.0, 20.0])
    show = CountProgress("ingest", 1000, stream=out, clock=lambda: next(now))
    show.update(100)  # 2 s: the first batch, shown
    show.update(100)  # 5 s: quiet
    show.update(300)  # 14 s: shown
    show.update(500)  # 20 s: the end, shown
    first, second, last = out.getvalue().splitlines()
    assert first == "ingest  100/1,000 records (10%)  50 records/s  ~18 s left"
    assert second.startswith("ingest  500/1,000 records (50%)") and second.endswith("~14 s left")
    assert last == "ingest  1,000/1,000 records (100%)  50 records/s"


def test_ingest_reports_its_progress_as_lines_when_stderr_is_not_a_terminal(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecgproto.data.ingest import IngestConfig, ingest

    ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1))
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("ingest  240/240 records (100%)")  # no bar codes, a readable last line
    assert all("\r" not in line and "\x1b" not in line for line in lines)
