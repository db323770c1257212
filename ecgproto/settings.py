"""Where things live on disk, and the environment defaults that keep Prefect and MLflow local.

Everything defaults to the project's working directory; every path can be overridden by an env var.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def in_checkout() -> bool:
    """True when the package runs from its source tree (an editable install or `python -m` in the clone);
    False when installed from a wheel."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "flows").is_dir()


def workdir() -> Path:
    """The folder that holds mlflow/, .prefect/ and data/: ECGPROTO_HOME if set, else the checkout, else (an
    installed wheel) the current directory, as MLflow's own default store is."""
    if "ECGPROTO_HOME" in os.environ:
        return Path(os.environ["ECGPROTO_HOME"]).resolve()
    return PROJECT_ROOT if in_checkout() else Path.cwd().resolve()


def reference_dir() -> Path:
    """Reference tables that ship with the project (scp branches, phecode maps): `data/` in the checkout,
    installed as the package data `ecgproto/reference/` by a wheel."""
    if "ECGPROTO_REFERENCE_DIR" in os.environ:
        return Path(os.environ["ECGPROTO_REFERENCE_DIR"]).resolve()
    return PROJECT_ROOT / "data" if in_checkout() else Path(str(files("ecgproto") / "reference"))


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


DEFAULT_UI_PORT = 5000


def ui_url() -> str:
    """Where the MLflow UI is browsed, for the run links commands print: ECGPROTO_UI_URL if set (e.g. a proxy,
    another port); else a tracking server's own address (it serves the UI); else `ecgproto ui` on this machine."""
    if url := os.environ.get("ECGPROTO_UI_URL", "").strip():
        return url.rstrip("/")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):
        return tracking.rstrip("/")
    return f"http://127.0.0.1:{DEFAULT_UI_PORT}"


def configure_environment() -> None:
    """Local, quiet defaults for Prefect and MLflow; a value the user already set always wins.

    Must run before `prefect` is imported: Prefect reads its settings at import time.
    """
    home = workdir()
    # a new ECGPROTO_HOME is created here: Prefect cannot make its home inside a folder that does not exist
    home.mkdir(parents=True, exist_ok=True)
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
