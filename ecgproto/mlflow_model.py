"""The MLflow model of ecgproto: a `python_function` flavor whose loader is this module, so the
registry holds the weights and their JSON description (`ecgproto.model.persist`), never a pickle.

    mlflow.pyfunc.load_model("models:/ecgproto-protoecgnet@champion").predict(x)  # (B, 12, n) -> (B, 71)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgproto.model import persist

WEIGHTS = "weights.pt"


class ECGProtoPyfunc:
    """What `mlflow.pyfunc.load_model` returns: label probabilities for (B, 12, n) float32 mV ECGs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str) -> ECGProtoPyfunc:
    """MLflow's entry point for the python_function flavor (`loader_module`)."""
    return ECGProtoPyfunc(load_from_data(Path(data_path)))


def load_from_data(data_path: Path) -> torch.nn.Module:
    """The network in a logged model's data folder."""
    return persist.load(Path(data_path) / WEIGHTS)
