"""What a stage hands to MLflow: params, metrics, tables, figures, JSON documents. Pure data.

Stage modules build a StageReport; `ecgproto.tracking.log_report` is the only code that sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


@dataclass
class StageReport:
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path without suffix
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact path with .png
    documents: dict[str, Any] = field(default_factory=dict)  # artifact path with .json
    tags: dict[str, str] = field(default_factory=dict)
    formats: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table path -> formats; default csv+parquet


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested configs as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
