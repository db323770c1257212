"""One registry of named configurations; `auto` picks the validated one on every device and says why."""

from __future__ import annotations

import argparse

import pytest
import torch

from ecgproto.train.config import PRESETS, TrainConfig, resolve_preset


def test_auto_picks_the_validated_design_on_a_gpu_too_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecgproto import cli
    from ecgproto.train import stages

    monkeypatch.setattr(stages, "resolve_device", lambda name: torch.device("cuda"))  # a machine with CUDA
    config = cli._train_config(argparse.Namespace(small=False, config="auto", device="auto"))
    said = capsys.readouterr().err
    assert "training the small configuration" in said and "a GPU is here" in said and "only faster" in said
    small = TrainConfig.small()
    assert config == small  # beat prototypes, the teacher, the square-root fusion weighting
    assert config.model.branches["morphology_2d_local"].pool == "beat" and config.loss.distill > 0
    assert resolve_preset("auto", cuda=False)[0] == "small"
    assert resolve_preset("reference", cuda=True) == ("reference", "asked for")


def test_every_preset_is_built_from_the_registry_and_large_keeps_the_validated_design() -> None:
    for name in PRESETS:
        assert isinstance(TrainConfig.preset(name), TrainConfig)
    large, small = TrainConfig.preset("large"), TrainConfig.preset("small")
    assert large.loss == small.loss and large.model.fusion == small.model.fusion  # teacher, fusion weighting, heads
    for name, branch in large.model.branches.items():
        assert (
            branch.pool == small.model.branches[name].pool and branch.latent_dim > small.model.branches[name].latent_dim
        )
    assert TrainConfig.preset("reference") == TrainConfig()
    with pytest.raises(ValueError, match="unknown configuration"):
        TrainConfig.preset("huge")


def test_one_plan_orders_the_stages_the_flow_and_the_benchmarks_run() -> None:
    from ecgproto.train.stages import plan

    small = [s.key for s in plan(TrainConfig.preset("small"))]
    # the black box teaches: it trains first; each branch is trained, projected onto real cases, re-headed
    assert small[0] == "baseline" and small[-1] == "fusion" and small.count("baseline") == 1
    assert small[1:4] == ["joint.rhythm_1d", "projection.rhythm_1d", "last_layer.rhythm_1d"]
    assert len(small) == 1 + 3 * 3 + 1
    reference = [s.key for s in plan(TrainConfig.preset("reference"))]
    assert reference[-2:] == ["fusion", "baseline"]  # no teacher: the black box is trained last, for comparison
    alone = TrainConfig.preset("reference")
    alone.baseline.enabled = False
    assert "baseline" not in [s.stage for s in plan(alone)]
