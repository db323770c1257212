"""The 71 PTB-XL SCP statements, their three model branches, and multi-hot targets from `scp_codes`."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ecgproto.settings import reference_dir

BRANCHES: tuple[str, ...] = ("rhythm_1d", "morphology_2d_local", "global_2d")


class LabelError(ValueError):
    """A record's `scp_codes` field cannot be read as a code -> likelihood mapping."""


@dataclass(frozen=True)
class LabelSet:
    """Label order of the model (`label_index` of scp_branches.csv) and each branch's view of it."""

    codes: tuple[str, ...]
    descriptions: tuple[str, ...]
    branch_of: tuple[str, ...]

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.codes)}

    def branch_indices(self, branch: str) -> np.ndarray:
        """Label indices of one branch, in branch order (`index_in_branch`)."""
        if branch not in BRANCHES:
            raise KeyError(f"unknown branch {branch!r}; choose one of {BRANCHES}")
        return np.array([i for i, b in enumerate(self.branch_of) if b == branch], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.codes)


@lru_cache(maxsize=4)
def load_label_set(path: Path | None = None) -> LabelSet:
    path = path or reference_dir() / "scp_branches.csv"
    table = pd.read_csv(path).sort_values("label_index")
    if list(table["label_index"]) != list(range(len(table))):
        raise ValueError(f"{path}: label_index must run 0..{len(table) - 1} without gaps")
    # Branch order inside each branch must follow index_in_branch, which equals label order here.
    for branch, group in table.groupby("branch"):
        if list(group["index_in_branch"]) != list(range(len(group))):
            raise ValueError(f"{path}: index_in_branch of {branch} is not 0..n-1 in label order")
    return LabelSet(
        codes=tuple(table["scp_code"]),
        descriptions=tuple(table["description"]),
        branch_of=tuple(table["branch"]),
    )


MAX_SCP_CODES_CHARS = 2000


def parse_scp_codes(text: object) -> dict[str, float]:
    """Read PTB-XL's `scp_codes` ("{'NORM': 100.0, 'SR': 0.0}") into a dict; raise LabelError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise LabelError(f"scp_codes is empty or not text: {text!r}")
    if len(text) > MAX_SCP_CODES_CHARS:  # PTB-XL's longest is ~100 characters; a huge cell would exhaust memory
        raise LabelError(
            f"scp_codes is {len(text):,} characters long (at most {MAX_SCP_CODES_CHARS:,}): {text[:40]!r}..."
        )
    return dict(_scp_items(text))


@lru_cache(maxsize=65_536)
def _scp_items(text: str) -> tuple[tuple[str, float], ...]:
    """The parse of one scp_codes cell (cached: a dataset repeats a few thousand distinct cells)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:  # nested or huge expressions
        raise LabelError(f"scp_codes is not a Python dict literal: {text[:80]!r}") from exc
    if not isinstance(value, dict):
        raise LabelError(f"scp_codes is a {type(value).__name__}, not a dict: {text[:80]!r}")
    out: list[tuple[str, float]] = []
    for code, likelihood in value.items():
        if not isinstance(code, str) or isinstance(likelihood, bool) or not isinstance(likelihood, int | float):
            raise LabelError(f"scp_codes entry {code!r}: {likelihood!r} is not code -> number")
        out.append((code, float(likelihood)))
    return tuple(out)


def multi_hot(codes: dict[str, float], labels: LabelSet, min_likelihood: float = 0.0) -> np.ndarray:
    """(n_labels,) uint8; a code counts when its likelihood >= min_likelihood. Unknown codes are ignored."""
    index = labels.index
    target = np.zeros(len(labels), dtype=np.uint8)
    for code, likelihood in codes.items():
        i = index.get(code)
        if i is not None and likelihood >= min_likelihood:
            target[i] = 1
    return target
