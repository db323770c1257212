"""Scale-out: ingest and scoring sharded over a local Dask cluster give what one process gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set
from ecgproto.data.store import ArrayStore
from ecgproto.model.config import ModelConfig
from ecgproto.model.network import ECGProtoNet
from ecgproto.phenotype.features import prototype_table, score_cohort, scores_from_activations
from ecgproto.scoring import (
    ActivationStore,
    local_processes,
    plan_scoring,
    score_rows,
    score_shard,
    score_store,
)
from ecgproto.train import losses, stages

pytest.importorskip("prefect_dask")


def small_model(seed: int = 3) -> ECGProtoNet:
    torch.manual_seed(seed)
    return ECGProtoNet(ModelConfig.small(), load_label_set()).eval()


def calibrated_model(store: ArrayStore) -> ECGProtoNet:
    """small_model() with its calibration fitted by the training's own step (stages.calibrate) on `store`, whose
    labels here are any split of each label's scores: what is tested is that scoring stores what the model says."""
    model = small_model()
    sims, probs = score_rows(model, store, store.manifest["row"].to_numpy(), batch_size=64)
    y = (probs > np.median(probs, axis=0)).astype(np.float32)
    stages.calibrate(model, torch.as_tensor(sims), y, losses.pos_weight(y))
    assert model.calibrated
    return model


@pytest.fixture(scope="module")
def mimic_store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> ArrayStore:
    return ingest(
        demo_root / "mimic-iv-ecg", tmp_path_factory.mktemp("stores"), IngestConfig(workers=1), progress=False
    ).store


def test_sharded_ingest_on_a_local_dask_cluster_writes_the_same_store(
    prefect_server: None, demo_root: Path, ptbxl_copy: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    from ecgproto.flows.ingest import ingest_flow
    from ecgproto.flows.scale import runner

    # a broken record must land in quarantine the same way on the cluster
    dat = next(iter(sorted((ptbxl_copy / "records100").rglob("*.dat"))))
    dat.write_bytes(dat.read_bytes()[:100])
    config = IngestConfig(workers=1, chunk_size=16)
    local = ingest(ptbxl_copy, tmp_path / "local", config, progress=False).store
    out = ingest_flow.with_options(task_runner=runner("local:2"))(
        str(ptbxl_copy), config, str(tmp_path / "cluster"), sharded=True
    )
    sharded = ArrayStore.open(out["store"])

    assert sharded.key == local.key and len(local.manifest) > 200
    assert np.array_equal(np.asarray(sharded.signals), np.asarray(local.signals))
    assert np.array_equal(np.asarray(sharded.labels), np.asarray(local.labels))
    pd.testing.assert_frame_equal(sharded.manifest, local.manifest)
    pd.testing.assert_frame_equal(sharded.quarantine, local.quarantine)
    assert any(dat.name in f for f in sharded.quarantine["file"].astype(str))


def test_sharded_scoring_on_a_local_dask_cluster_gives_the_same_activation_matrix(
    prefect_server: None, mimic_store: ArrayStore, mlflow_uri: str, tmp_path: Path
) -> None:
    from ecgproto import tracking
    from ecgproto.flows.scale import runner
    from ecgproto.flows.score import score_flow

    model = calibrated_model(mimic_store)
    run = tracking.start_run("train", uri=mlflow_uri)
    x = torch.from_numpy(np.array(mimic_store.signals[:1], dtype=np.float32))
    logged = tracking.log_model(run, model, x.numpy(), "ecgproto-test", uri=mlflow_uri)
    tracking.end_run(run, uri=mlflow_uri)

    one = score_store(mimic_store, model, tmp_path / "one", prototype_table(model), shard_size=10**6, batch_size=32)
    out = score_flow.with_options(task_runner=runner("local:2"))(
        str(mimic_store.path),
        f"models:/ecgproto-test/{logged['version']}",
        str(tmp_path / "sharded"),
        shard_size=64,
        batch_size=32,
        device="cpu",
        tracking_uri=mlflow_uri,
        sharded=True,
    )
    sharded = ActivationStore.open(out["activations"])

    n = len(mimic_store.manifest)
    assert len(sharded.info["shards"]) == -(-n // 64) > 1 and len(one.info["shards"]) == 1
    # a calibrated model's store also holds its calibrated probabilities and each ECG's uncertainty
    assert sharded.kinds == one.kinds == ("similarities", "probabilities", "calibrated", "uncertainty")
    assert tracking.describe(out["run_id"], mlflow_uri)["tags"]["calibrated"] == "true"
    for kind in sharded.kinds:
        a, b = one.matrix(kind), sharded.matrix(kind)
        assert a.dtype == (np.float32 if kind == "uncertainty" else np.float16) and a.shape[0] == n
        assert np.array_equal(a, b), f"{kind}: max |diff| {np.abs(a.astype(float) - b.astype(float)).max()}"
    pd.testing.assert_frame_equal(one.records.drop(columns="shard"), sharded.records.drop(columns="shard"))
    assert tracking.describe(out["run_id"], mlflow_uri)["metrics"]["n_scored"] == n

    # the float16 store holds what the in-memory scorer computes, to float16 precision
    rows = mimic_store.manifest["row"].to_numpy()[::-1]
    direct = score_cohort(model, mimic_store, rows, batch_size=32, progress=False)
    stored = scores_from_activations(sharded, rows)
    assert np.abs(stored.similarities - direct.similarities).max() < 2e-3
    assert np.abs(stored.probabilities - direct.probabilities).max() < 2e-3
    certainty = model.uncertainty(torch.as_tensor(direct.similarities))
    at = pd.Series(np.arange(n), index=sharded.records["row"].to_numpy()).loc[rows].to_numpy()
    calibrated = sharded.take(at, "calibrated")
    assert np.abs(calibrated - certainty["probability"].numpy()).max() < 2e-3
    assert np.abs(calibrated - direct.probabilities).max() > 0.05  # the calibration moved them
    assert stored.percentile is not None and direct.percentile is not None
    assert np.abs(stored.percentile - certainty["percentile"].numpy()).max() <= 1  # one percentile step at most
    assert np.abs(sharded.take(at, "uncertainty")[:, 0] - certainty["uncertainty"].numpy()).max() < 1e-4


def test_a_killed_scoring_run_resumes_with_only_the_missing_shards(mimic_store: ArrayStore, tmp_path: Path) -> None:
    model = small_model()
    plan = plan_scoring(mimic_store, model, tmp_path, shard_size=32, batch_size=16)
    assert plan.n_shards > 2
    score_shard(plan, 0, model=model)  # the run is killed after its first shard
    first = plan.shard_files(0)[0]
    before = first.stat().st_mtime_ns
    assert plan_scoring(mimic_store, model, tmp_path, shard_size=32, batch_size=16).pending() == list(
        range(1, plan.n_shards)
    )
    # the rest are scored by one single-threaded process per core (local_processes), the one-shard store below by
    # this process: the same numbers
    assert local_processes("cpu", plan.n_shards - 1, 2) == 2
    acts = score_store(mimic_store, model, tmp_path, prototype_table(model), shard_size=32, batch_size=16, processes=2)
    assert (acts.path / first.name).stat().st_mtime_ns == before  # published by rename, not re-scored
    whole = score_store(mimic_store, model, tmp_path / "again", prototype_table(model), shard_size=10**6, batch_size=16)
    assert np.array_equal(acts.matrix(), whole.matrix())
    # a model without calibration (one saved by an older ecgproto) stores what it has, and says what is missing
    assert acts.kinds == ("similarities", "probabilities")
    with pytest.raises(ValueError, match="holds no calibrated"):
        acts.matrix("calibrated")
    # another model is another store
    other = plan_scoring(mimic_store, small_model(seed=4), tmp_path, shard_size=32, batch_size=16)
    assert other.final != plan.final


def test_the_loader_scores_rows_in_the_order_asked_with_read_ahead_workers(mimic_store: ArrayStore) -> None:
    model = small_model()
    rows = mimic_store.manifest["row"].to_numpy()
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(rows)
    plain = score_cohort(model, mimic_store, rows, batch_size=len(rows), progress=False)
    read_ahead = score_cohort(model, mimic_store, shuffled, batch_size=16, progress=False, workers=2)
    back = np.argsort(shuffled)
    assert np.allclose(read_ahead.similarities[back], plain.similarities, atol=1e-5)
    assert np.allclose(read_ahead.probabilities[back], plain.probabilities, atol=1e-5)


def test_dask_runner_spec_is_checked() -> None:
    from ecgproto.flows.scale import runner

    assert runner(None) is None
    with pytest.raises(ValueError, match="local:N"):
        runner("localhost")
    with pytest.raises(ValueError, match=">= 1"):
        runner("local:0")
