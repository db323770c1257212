"""The MLflow model of ecgproto: a `python_function` flavor whose loader is this module, so the
registry holds the weights and their JSON description (`ecgproto.model.persist`), never a pickle.

    model = mlflow.pyfunc.load_model("models:/ecgproto-protoecgnet@champion")
    model.predict(x)  # (B, 12, n) -> (B, 71) probabilities as trained: the F1 thresholds apply to these
    model.predict(x, params={"output": "calibrated"})  # the calibrated probabilities (same ranks per label)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgproto.model import persist

WEIGHTS = "weights.pt"
OUTPUTS = ("probability", "calibrated")
PARAMS = {"output": "probability"}  # the signature's inference parameter and its default


class ECGProtoPyfunc:
    """What `mlflow.pyfunc.load_model` returns: label probabilities for (B, 12, n) float32 mV ECGs; with
    params={"output": "calibrated"} the calibrated ones (ECGProtoNet.uncertainty)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        output = (params or {}).get("output", PARAMS["output"])
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if output == "probability":
                return self.model(x).numpy()
            if not getattr(self.model, "calibrated", False):
                raise ValueError(
                    "this model carries no calibration (trained by an older ecgproto): train it again, or use "
                    "output='probability'"
                )
            return self.model.uncertainty(self.model.similarities(x))["probability"].numpy()


def _load_pyfunc(data_path: str) -> ECGProtoPyfunc:
    """MLflow's entry point for the python_function flavor (`loader_module`)."""
    return ECGProtoPyfunc(load_from_data(Path(data_path)))


def load_from_data(data_path: Path) -> torch.nn.Module:
    """The network in a logged model's data folder."""
    return persist.load(Path(data_path) / WEIGHTS)
