"""Models are saved as weights + a JSON description and rebuilt through their constructors; a model
file that would unpickle code is refused unread, in the working folder and in the MLflow registry."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgproto.data.labels import load_label_set
from ecgproto.model import persist
from ecgproto.model.baseline import ResNet1DClassifier
from ecgproto.model.config import ModelConfig
from ecgproto.model.network import ECGProtoNet


class Payload:
    """What a tampered model file carries: unpickling it runs `touch`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


def _model(seed: int = 0) -> ECGProtoNet:
    torch.manual_seed(seed)
    model = ECGProtoNet(ModelConfig.small(), load_label_set()).eval()
    model.source_signals = torch.randn(3, 12, 1000).to(torch.float16)
    model.provenance = [
        {"prototype": np.int64(i), "name": f"P{i:04d}", "fidelity": np.float32(0.5), "leads": "II"}
        for i in range(model.n_prototypes)
    ]
    return model


def test_a_saved_model_comes_back_identical_through_its_constructor(tmp_path: Path) -> None:
    model, x = _model(), torch.randn(2, 12, 1000)
    persist.save(model, tmp_path / "model.pt")
    again = persist.load(tmp_path / "model.pt")
    assert isinstance(again, ECGProtoNet) and again.provenance[5]["prototype"] == 5
    torch.testing.assert_close(again.source_signals, model.source_signals)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    net = ResNet1DClassifier(71, (8, 16, 16, 16), (1, 1, 1, 1)).eval()
    persist.save(net, tmp_path / "baseline.pt")
    with torch.no_grad():
        torch.testing.assert_close(persist.load(tmp_path / "baseline.pt")(x), net(x))


def test_a_tampered_or_pickled_model_file_is_refused_without_running_it(tmp_path: Path) -> None:
    persist.save(_model(), tmp_path / "model.pt")
    marker = tmp_path / "payload-ran"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(persist.ModelFileError, match="refusing to load it"):
        persist.load(tmp_path / "model.pt")
    assert not marker.exists()
    torch.save(_model(), tmp_path / "old.pt")  # how older versions saved: the pickled module, no description
    with pytest.raises(persist.ModelFileError, match="older ecgproto"):
        persist.load(tmp_path / "old.pt")


def test_the_registered_model_is_weights_not_a_pickle_and_pyfunc_still_scores(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch

    from ecgproto import tracking
    from ecgproto.train import losses, stages

    model, x = _model(), torch.randn(2, 12, 1000)
    with torch.no_grad():  # the calibration the training fits (labels: any split of the scores)
        sims = model.similarities(torch.randn(16, 12, 1000))
        prob = torch.sigmoid(model.fusion(sims)).numpy()
    y = (prob > np.median(prob, axis=0)).astype(np.float32)
    stages.calibrate(model, sims, y, losses.pos_weight(y))
    run = tracking.start_run("fusion", uri=mlflow_uri)
    out = tracking.log_model(run, model, x[:1].numpy(), "ecgproto-test", mlflow_uri)
    loaded = tracking.load_model(f"models:/ecgproto-test/{out['version']}", mlflow_uri)
    with torch.no_grad():
        expected = model(x).numpy()
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    served = mlflow.pyfunc.load_model(out["model_uri"])
    np.testing.assert_allclose(served.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    # the calibrated probabilities, on request (an inference parameter of the signature)
    with torch.no_grad():
        calibrated = model.uncertainty(model.similarities(x))["probability"].numpy()
    assert np.abs(calibrated - expected).max() > 0.01
    np.testing.assert_allclose(served.predict(x.numpy(), params={"output": "calibrated"}), calibrated, atol=1e-6)
    with pytest.raises(ValueError, match="choose one of probability, calibrated"):
        served.predict(x.numpy(), params={"output": "logits"})
    # the commands' default, @champion, falls back to the latest version (with a warning) until one is promoted
    assert tracking.resolve_model_uri("models:/ecgproto-test@champion", mlflow_uri) == "models:/ecgproto-test/latest"
    tracking.set_alias("ecgproto-test", "champion", out["version"], mlflow_uri)
    assert tracking.resolve_model_uri("models:/ecgproto-test@champion", mlflow_uri) == "models:/ecgproto-test@champion"
    artifacts = Path(tracking.client(mlflow_uri).get_run(run).info.artifact_uri.removeprefix("file://"))
    assert not list(artifacts.rglob("*.pkl")) and not list(artifacts.rglob("*.pth"))

    marker = tmp_path / "payload-ran"  # replace the registered weights with a payload
    for weights in Path(mlflow_uri.removeprefix("sqlite:///")).parent.rglob("weights.pt"):
        weights.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(persist.ModelFileError, match="refusing to load it") as refused:
        tracking.load_model(f"models:/ecgproto-test/{out['version']}", mlflow_uri)
    assert not marker.exists()
    # the message names the model the user asked for, not a temporary download folder that is gone
    assert str(refused.value).startswith(f"models:/ecgproto-test/{out['version']}: ")
    assert tempfile.gettempdir() not in str(refused.value)

    old = tracking.start_run("fusion", uri=mlflow_uri)  # a champion registered by an older version
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run(run_id=old):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    with pytest.raises(persist.ModelFileError, match="older ecgproto"):
        tracking.load_model(info.model_uri, mlflow_uri)


def test_a_model_saved_with_since_retired_options_loads_when_it_used_their_kept_value(tmp_path: Path) -> None:
    """Earlier versions wrote sharpness, topk, latent and the fusion mode into every model description."""
    import json

    model, x = _model(), torch.randn(2, 12, 1000)
    persist.save(model, tmp_path / "model.pt")
    meta_file = tmp_path / "model.json"
    meta = json.loads(meta_file.read_text())
    for branch in meta["config"]["branches"].values():
        branch.update(sharpness=1.0, topk=3, latent="standardised")
    meta["config"]["fusion"]["mode"] = "sparse_nonneg"
    meta_file.write_text(json.dumps(meta))
    with torch.no_grad():
        torch.testing.assert_close(persist.load(tmp_path / "model.pt")(x), model(x))
    meta["config"]["fusion"]["mode"] = "dense"  # a design this version no longer builds: refused, named
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(persist.ModelFileError, match="fusion.mode = 'dense'"):
        persist.load(tmp_path / "model.pt")
    meta["config"]["fusion"]["mode"] = "sparse_nonneg"
    meta["config"]["branches"]["morphology_2d_local"]["pool"] = "row_latent"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(persist.ModelFileError, match="branches.morphology_2d_local.pool"):
        persist.load(tmp_path / "model.pt")
