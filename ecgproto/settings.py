"""Where things live on disk, and the environment defaults that keep Prefect and MLflow local.

Everything defaults to the project's working directory; every path can be overridden by an env var.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def workdir() -> Path:
    """The folder that holds mlflow/, .prefect/ and data/ (the checkout unless ECGPROTO_HOME is set)."""
    return Path(os.environ.get("ECGPROTO_HOME", PROJECT_ROOT)).resolve()


def reference_dir() -> Path:
    """Reference tables that ship with the project (scp branches, phecode maps)."""
    return Path(os.environ.get("ECGPROTO_REFERENCE_DIR", PROJECT_ROOT / "data")).resolve()


def demo_dir() -> Path:
    return Path(os.environ.get("ECGPROTO_DEMO_DIR", workdir() / "data" / "demo")).resolve()


def store_root() -> Path:
    return Path(os.environ.get("ECGPROTO_STORE_ROOT", workdir() / "data" / "store")).resolve()


MODEL_NAME = "ecgproto-protoecgnet"  # the registered model every command uses by default
DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@champion"  # falls back to the latest version (tracking.resolve_model_uri)


def mlflow_dir() -> Path:
    return workdir() / "mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlflow_dir() / 'mlflow.db'}"


def configure_environment() -> None:
    """Local, quiet defaults for Prefect and MLflow; a value the user already set always wins.

    Must run before `prefect` is imported: Prefect reads its settings at import time.
    """
    home = workdir()
    defaults = {
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / ".prefect" / "results"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        # an unreachable tracking server fails in seconds, not after minutes of retries with backoff
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # loading a model is not a download the user asked for
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
