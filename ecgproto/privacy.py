"""Rules for credentialed data: no identifiers in exports, no count below the small-cell limit."""

from __future__ import annotations

import re

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


_PATH = re.compile(r"(?:[A-Za-z]:)?[\w.~-]*(?:[/\\][\w.~-]+)+[/\\]?")  # a/b, /x/y.dat, files/p10/p1000/s4
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?\b")  # a (shifted) date or time
_NUMBER_ID = re.compile(r"\b[A-Za-z]?\d{4,}\b")  # subject, admission, study and record numbers
_QUOTED = re.compile(r"(['\"])[^'\"]*\d[^'\"]*\1")  # a quoted name holding digits: a record or file name
_SMALL_COUNT = re.compile(  # a count of people or their records below the small-cell limit
    r"\b[1-9]\b(?=\s+(?:records?|ECGs?|admissions?|subjects?|patients?|cases?|controls?|rows?|stud(?:y|ies))\b)",
    re.IGNORECASE,
)


def scrub_message(text: str) -> str:
    """An error message as a credentialed cohort's run may keep it: its sentence, without the identifiers it
    may carry (record paths, subject/admission/study numbers, dates, quoted names, counts below 10)."""
    text = _PATH.sub("<path>", text)
    text = _DATE.sub("<date>", text)
    text = _QUOTED.sub("<name>", text)
    text = _NUMBER_ID.sub("<id>", text)
    return _SMALL_COUNT.sub("<10", text)


def drop_identifiers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in IDENTIFIER_COLUMNS if c in frame.columns])


# --- complementary suppression ----------------------------------------------------------------
#
# Hiding each count below the limit is not enough when the exports also give totals: a chapter's
# hidden 2 is the version total minus the other chapters. `Disclosure` holds every count a run
# exports (and the unpublished ones a reader could compute, such as the admissions a cohort step
# removed) with the linear relations among them, and hides further counts until no relation lets
# a reader compute a count, or a sum of hidden counts, between 1 and min_cell - 1.

SECONDARY = "suppressed"  # a hidden complement (a hidden small count shows as "<min_cell")


class Disclosure:
    """Counts and the linear relations a reader knows among them; `protect` decides what is hidden.

    A cell is published (a number in some table or metric) or virtual (never printed, but derivable
    from published cells, e.g. the difference of two consecutive cohort-flow counts). Relations are
    sum(coefficient * value) == 0 over their cells.
    """

    def __init__(self, min_cell: int = MIN_CELL) -> None:
        self.min_cell = min_cell
        self.values: list[int] = []
        self.published: list[bool] = []
        self.keep: list[int] = []
        self.relations: list[tuple[list[int], list[int]]] = []

    def cell(self, value: int, published: bool = True, keep: int = 0) -> int:
        """A count; among candidates for a complementary suppression, lower `keep` is hidden first
        (e.g. a cohort's analysed total gets a higher one than the steps before it)."""
        self.values.append(int(value))
        self.published.append(published)
        self.keep.append(keep)
        return len(self.values) - 1

    def total(self, total: int, parts: list[int]) -> None:
        """total == sum(parts)."""
        self.relations.append(([total, *parts], [1] + [-1] * len(parts)))

    def chain(self, counts: list[int]) -> None:
        """Counts that only go down (a cohort flow): any two differ by a count of what left between them."""
        for i, a in enumerate(counts):
            for b in counts[i + 1 :]:
                self.total(a, [b, self.cell(self.values[a] - self.values[b], published=False)])

    def small(self, value: int) -> bool:
        return 0 < value < self.min_cell

    def protect(self) -> np.ndarray:
        """Hidden mask over cells: the small published counts, and the fewest further counts (smallest
        first) so that no relation gives a small count or a small sum of hidden counts."""
        v = np.asarray(self.values, dtype=np.int64)
        hidden = ~np.asarray(self.published, dtype=bool) | np.array([self.small(x) for x in self.values], dtype=bool)
        for _ in range(len(v) + 1):
            changed = False
            for r, (cells, coefs) in enumerate(self.relations):
                if not hidden[cells].any():
                    continue
                # what the reader knows without this relation, then what this relation adds: the signed
                # sum of its remaining unknown cells; of one sign, that sum is a count and must not be small
                known = self._derivable(hidden, skip=r)
                unknown = [i for i, c in enumerate(cells) if not known[c]]
                if not unknown or len({np.sign(coefs[i]) for i in unknown}) > 1:
                    continue
                if self.small(abs(int(sum(coefs[i] * v[cells[i]] for i in unknown)))):
                    changed |= self._hide_one_more(hidden, cells)
            # what several relations together determine (a 2D table's margins): linear algebra
            for leak in self.audit(hidden):
                changed |= self._hide_one_more(
                    hidden, [c for cells, _ in self.relations if leak in cells for c in cells]
                )
            if not changed:
                break
        return hidden

    def _hide_one_more(self, hidden: np.ndarray, cells: list[int]) -> bool:
        """Hide the published nonzero count among `cells` that costs least (lowest keep, then smallest)."""
        candidates = [c for c in cells if not hidden[c] and self.values[c] > 0]
        if not candidates:
            return False
        hidden[min(candidates, key=lambda c: (self.keep[c], self.values[c], c))] = True
        return True

    def _derivable(self, hidden: np.ndarray, skip: int = -1) -> np.ndarray:
        """Cells a reader can compute: published ones, then any cell alone unknown in a relation
        (all relations but `skip`)."""
        known = ~hidden
        for _ in range(len(known) + 1):
            grew = False
            for r, (cells, _) in enumerate(self.relations):
                if r == skip:
                    continue
                unknown = [c for c in cells if not known[c]]
                if len(unknown) == 1:
                    known[unknown[0]] = True
                    grew = True
            if not grew:
                break
        return known

    def audit(self, hidden: np.ndarray) -> list[int]:
        """Hidden small cells a reader can compute exactly by linear algebra over all relations: those
        whose coordinate is zero in every solution of the homogeneous system (should be none)."""
        cols = np.flatnonzero(hidden)
        if len(cols) == 0:
            return []
        index = {c: i for i, c in enumerate(cols)}
        A = np.zeros((max(len(self.relations), 1), len(cols)))
        for r, (cells, coefs) in enumerate(self.relations):
            for c, k in zip(cells, coefs, strict=True):
                if c in index:
                    A[r, index[c]] += k
        _, sv, vt = np.linalg.svd(A, full_matrices=True)
        rank = int((sv > 1e-9 * max(sv.max(initial=0.0), 1.0)).sum())
        null = vt[rank:]  # basis of the directions the published numbers leave free
        free = np.abs(null).max(axis=0) > 1e-9 if len(null) else np.zeros(len(cols), dtype=bool)
        return [int(c) for c, f in zip(cols, free, strict=True) if not f and self.small(self.values[c])]

    def shown(self, cells: np.ndarray | list[int], hidden: np.ndarray) -> list[str]:
        """Cells as exported: the number, '<10' for a hidden small count, 'suppressed' for a hidden complement."""
        out = []
        for c in cells:
            c = int(c)
            if not hidden[c]:
                out.append(str(self.values[c]))
            else:
                out.append(f"<{self.min_cell}" if self.small(self.values[c]) else SECONDARY)
        return out
