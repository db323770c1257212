"""How the command line reports a failure: one line on stderr, exit 2 for a user error (a path, a file,
a value, a model that is not there), 1 for anything else; the traceback only when asked for
(`ecgproto --debug ...` or ECGPROTO_DEBUG=1). Imported by the CLI only; the library raises the types in
ecgproto.errors (and its modules' own, listed here)."""

from __future__ import annotations

import logging
import os
import tomllib

from ecgproto.errors import UserError


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("ECGPROTO_DEBUG", "").lower() in ("1", "true", "yes")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from ecgproto.data.labels import LabelError
    from ecgproto.data.layouts import DatasetError
    from ecgproto.data.wfdb_io import RecordError
    from ecgproto.phenotype.cohort import CohortError
    from ecgproto.phenotype.phecodes import PhecodeError

    return (
        UserError,
        DatasetError,
        RecordError,
        LabelError,
        CohortError,
        PhecodeError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        tomllib.TOMLDecodeError,
        ValidationError,
    )


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the command line."""
    if isinstance(exc, _user_error_types()):
        text = str(exc).strip().splitlines()
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):  # pydantic: name each bad field
            errors = exc.errors()
            text = ["; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])]
        if isinstance(exc, OSError) and getattr(exc, "filename", None):
            text = [f"{exc.filename}: {exc.strerror or exc}"]
        return 2, (text[0] if text else type(exc).__name__)
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(exc, MlflowException):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if any(
            s in first
            for s in ("Max retries exceeded", "Failed to establish a new connection", "Connection refused", "timed out")
        ):
            from ecgproto.settings import default_tracking_uri

            return 2, (
                f"the MLflow tracking server {default_tracking_uri()} cannot be reached - start it, "
                "or unset MLFLOW_TRACKING_URI to use the local store"
            )
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return 2, f"{first} - train and register a model first (`ecgproto train`), or pass --model"
        return 1, f"MLflow: {first}"
    return 1, f"{type(exc).__name__}: {exc} (a bug? run again with --debug for the traceback)"


class _NoEngineTracebacks(logging.Filter):
    """Prefect logs a failed flow or task at ERROR with its traceback before the exception reaches the
    command line, which then says what went wrong in one line: keep those records off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine")


# MLflow announces at INFO that it creates or migrates its SQLite tables: noise on a command's console
STORE_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def quiet_engine_errors() -> None:
    """Filter Prefect's run loggers themselves: Prefect sets up its console handler later, at the first flow.
    Also keeps the tracking store's table set-up messages off the console."""
    for name in STORE_SETUP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoEngineTracebacks) for f in logger.filters):
            logger.addFilter(_NoEngineTracebacks())
