"""The counts a study exports, protected together: small cells hidden, and the complements that stop
a reader from getting them back from the totals (see `ecgproto.privacy.Disclosure`).

Relations a reader knows: cohort-flow counts only go down (any two steps differ by what left between
them); each phecode's cases + controls + excluded = the subjects analysed; a prediction target's
cases and controls are its phecode's; ICD chapters add up to their version and mapped = exact +
trimmed, within rows; a mapping rate with its row count gives the mapped count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecgproto.phenotype.cohort import LISTED_STEP
from ecgproto.privacy import Disclosure

COUNTS = ("n_cases", "n_controls", "n_excluded")
MAPPING = ("rows", "mapped", "exact", "trimmed")


@dataclass
class ProtectedCounts:
    flow: pd.DataFrame
    phecodes: pd.DataFrame  # the tested phecodes with exported (string) counts
    by_version: pd.DataFrame
    by_chapter: pd.DataFrame
    prediction: pd.DataFrame
    cohort_admissions: float  # NaN when hidden
    cohort_subjects: float
    leaks: list[int]  # small counts still derivable by linear algebra (an audit; empty by construction)

    def counts_of(self, phecodes: pd.Series) -> pd.DataFrame:
        """Exported n_cases / n_controls / n_excluded for rows naming these phecodes."""
        table = self.phecodes.set_index("phecode")[list(COUNTS)]
        return table.loc[phecodes.astype(str).to_numpy()].reset_index(drop=True)


def protect_study_counts(
    flow: pd.DataFrame,
    phecodes: pd.DataFrame,
    by_version: pd.DataFrame,
    by_chapter: pd.DataFrame,
    prediction: pd.DataFrame,
    min_cell: int,
) -> ProtectedCounts:
    d = Disclosure(min_cell)
    # cohort flow: one chain for ECGs, one for admissions then subjects; the subjects analysed are kept longest
    flow_cells = []
    for i, (step, unit, n) in enumerate(zip(flow["step"], flow["unit"], flow["n"], strict=True)):
        last = i == len(flow) - 1
        keep = 2 if last else 1 if unit == "admissions" and flow["unit"].iloc[i + 1] != "admissions" else 0
        # the records the dataset lists are published by the ingest run: hiding them here would hide nothing
        flow_cells.append(d.cell(int(n), keep=3 if step == LISTED_STEP else keep))
    units = flow["unit"].to_numpy()
    d.chain([c for c, u in zip(flow_cells, units, strict=True) if u == "ECGs"])
    d.chain([c for c, u in zip(flow_cells, units, strict=True) if u in ("admissions", "subjects")])
    subjects = flow_cells[-1]
    admissions = [c for c, u in zip(flow_cells, units, strict=True) if u == "admissions"][-1]

    row_cells = {}
    for _, row in phecodes.iterrows():
        # a complement hides the controls (or the excluded) before the cases, which a reader needs most
        cells = [d.cell(int(row[c]), keep=1 if c == "n_cases" else 0) for c in COUNTS]
        d.total(subjects, cells)
        row_cells[str(row["phecode"])] = cells

    def mapping_cells(table: pd.DataFrame) -> list[list[int]]:
        out = []
        for _, row in table.iterrows():
            cells = [d.cell(int(row[c])) for c in MAPPING]
            d.total(cells[1], [cells[2], cells[3]])  # mapped = exact + trimmed
            d.total(cells[0], [cells[1], d.cell(int(row["rows"] - row["mapped"]), published=False)])
            out.append(cells)
        return out

    version_cells = mapping_cells(by_version)
    chapter_cells = mapping_cells(by_chapter)
    for v_row, v_cells in zip(by_version["icd_version"], version_cells, strict=True):
        members = [c for c_row, c in zip(by_chapter["icd_version"], chapter_cells, strict=True) if c_row == v_row]
        for k in range(len(MAPPING)):
            d.total(v_cells[k], [m[k] for m in members])

    pred_cells = []
    for _, row in prediction.iterrows():
        own = row_cells.get(str(row["phecode"]))
        if own is not None and (int(row["n_cases"]), int(row["n_controls"])) == (d.values[own[0]], d.values[own[1]]):
            pred_cells.append(own[:2])
        else:
            pred_cells.append([d.cell(int(row["n_cases"])), d.cell(int(row["n_controls"]))])

    hidden = d.protect()

    def shown(table: pd.DataFrame, cells: list[list[int]], columns: tuple[str, ...]) -> pd.DataFrame:
        out = table.copy()
        for k, col in enumerate(columns):
            out[col] = d.shown([c[k] for c in cells], hidden) if len(cells) else pd.Series(dtype=str)
        return out

    flow_out = flow.copy()
    flow_out["n"] = d.shown(flow_cells, hidden)
    v_out, c_out = shown(by_version, version_cells, MAPPING), shown(by_chapter, chapter_cells, MAPPING)
    for table, cells in ((v_out, version_cells), (c_out, chapter_cells)):  # a rate and its rows give mapped
        if len(cells):
            table.loc[[bool(hidden[c[0]] or hidden[c[1]]) for c in cells], "mapping_rate"] = np.nan
    p_out = shown(prediction, pred_cells, ("n_cases", "n_controls"))
    ph_out = shown(phecodes, [row_cells[str(p)] for p in phecodes["phecode"]], COUNTS)

    def metric(cell: int) -> float:
        return float("nan") if hidden[cell] else float(d.values[cell])

    return ProtectedCounts(flow_out, ph_out, v_out, c_out, p_out, metric(admissions), metric(subjects), d.audit(hidden))
