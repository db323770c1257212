"""Rules for credentialed data: no identifiers in exports, no count below the small-cell limit."""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_CELL = 10
IDENTIFIER_COLUMNS = ("subject_id", "hadm_id", "study_id", "record_id", "patient_id", "file", "path", "ecg_time")


def suppress_count(n: int, min_cell: int = MIN_CELL) -> int | str:
    """A count as exported: itself, or '<10' when 0 < n < min_cell."""
    return f"<{min_cell}" if 0 < n < min_cell else int(n)


def suppress_counts(frame: pd.DataFrame, columns: list[str], min_cell: int = MIN_CELL) -> pd.DataFrame:
    """Count columns as exported strings (see `suppress_count`), vectorised for million-row tables."""
    out = frame.copy()
    for c in columns:
        n = out[c].to_numpy().astype(np.int64)
        out[c] = np.where((n > 0) & (n < min_cell), f"<{min_cell}", n.astype(str))
        out[c] = out[c].astype(str)
    return out


def drop_identifiers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in IDENTIFIER_COLUMNS if c in frame.columns])
