"""ICD-9-CM / ICD-10-CM billing codes -> phecodes (Phecode 1.2 or PhecodeX), and the case/control
status of every admission for every phecode (roll-up, exclusion ranges, sex restrictions).

MIMIC stores codes undotted; `dot_icd` puts the dot back (after 3 characters, after 4 for ICD-9
E codes). A code missing from the map falls back by trimming its last character until it matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ecgproto.settings import reference_dir

PhecodeVersion = Literal["1.2", "X"]
MAP_FILES = {"1.2": "phecode12_icd9cm_icd10cm.csv.gz", "X": "phecodeX_icd9cm_icd10cm.csv.gz"}

# ICD chapters, for the mapping report. ICD-9-CM by numeric range, ICD-10-CM by letter range.
_ICD9_CHAPTERS = [
    (1, 139, "infectious"),
    (140, 239, "neoplasms"),
    (240, 279, "endocrine/metabolic"),
    (280, 289, "blood"),
    (290, 319, "mental"),
    (320, 389, "nervous/sense organs"),
    (390, 459, "circulatory"),
    (460, 519, "respiratory"),
    (520, 579, "digestive"),
    (580, 629, "genitourinary"),
    (630, 679, "pregnancy"),
    (680, 709, "skin"),
    (710, 739, "musculoskeletal"),
    (740, 759, "congenital"),
    (760, 779, "perinatal"),
    (780, 799, "symptoms/ill-defined"),
    (800, 999, "injury/poisoning"),
]
_ICD10_CHAPTERS = [
    ("A00", "B99", "infectious"),
    ("C00", "D49", "neoplasms"),
    ("D50", "D89", "blood"),
    ("E00", "E89", "endocrine/metabolic"),
    ("F01", "F99", "mental"),
    ("G00", "G99", "nervous"),
    ("H00", "H59", "eye"),
    ("H60", "H95", "ear"),
    ("I00", "I99", "circulatory"),
    ("J00", "J99", "respiratory"),
    ("K00", "K95", "digestive"),
    ("L00", "L99", "skin"),
    ("M00", "M99", "musculoskeletal"),
    ("N00", "N99", "genitourinary"),
    ("O00", "O9A", "pregnancy"),
    ("P00", "P96", "perinatal"),
    ("Q00", "Q99", "congenital"),
    ("R00", "R99", "symptoms/ill-defined"),
    ("S00", "T88", "injury/poisoning"),
    ("U00", "U85", "special purposes"),
    ("V00", "Y99", "external causes"),
    ("Z00", "Z99", "supplementary (factors)"),
]
SUPPLEMENTARY = {"supplementary (V codes)", "external causes (E codes)", "external causes", "supplementary (factors)"}


class PhecodeError(ValueError):
    """The phecode map or the diagnosis table cannot be used as given."""


def dot_icd(code: str, version: int) -> str:
    """Undotted MIMIC code -> dotted ICD: '42731' -> '427.31', 'E8497' -> 'E849.7', 'I480' -> 'I48.0'."""
    code = str(code).strip().upper().replace(".", "")
    if version not in (9, 10):
        raise PhecodeError(f"icd_version must be 9 or 10, got {version!r} (code {code!r})")
    at = 4 if version == 9 and code.startswith("E") else 3
    return code if len(code) <= at else f"{code[:at]}.{code[at:]}"


def icd_chapter(code: str, version: int) -> str:
    """The ICD chapter of a (dotted or undotted) code; 'malformed' when it has no chapter."""
    c = str(code).strip().upper().replace(".", "")
    if not c:
        return "malformed"
    if version == 9:
        if c[0] == "V":
            return "supplementary (V codes)"
        if c[0] == "E":
            return "external causes (E codes)"
        if not c[:3].isdigit():
            return "malformed"
        n = int(c[:3])
        return next((name for lo, hi, name in _ICD9_CHAPTERS if lo <= n <= hi), "malformed")
    head = c[:3]
    if len(head) < 3 or not head[0].isalpha() or not head[1].isdigit():
        return "malformed"
    return next((name for lo, hi, name in _ICD10_CHAPTERS if lo <= head <= hi), "malformed")


@dataclass
class PhecodeMap:
    """One phecode version: ICD (dotted, per version) -> phecodes it counts toward, and each phecode's info."""

    version: PhecodeVersion
    icd_to_phecodes: dict[tuple[str, int], tuple[str, ...]]
    info: pd.DataFrame  # index phecode; phecode_string, phecode_category, sex, exclude_range (tuple)
    _codes_by_version: dict[int, frozenset[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, version: PhecodeVersion = "1.2", path: Path | None = None) -> PhecodeMap:
        if version not in MAP_FILES:
            raise PhecodeError(f"unknown phecode version {version!r}; choose '1.2' or 'X'")
        path = path or reference_dir() / "phecodes" / MAP_FILES[version]
        if not path.exists():
            raise PhecodeError(f"{path}: phecode map not found (ships in the package's data/phecodes/)")
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        need = ["phecode", "ICD", "flag", "phecode_string", "phecode_category", "sex"]
        missing = [c for c in need if c not in raw.columns]
        if missing:
            raise PhecodeError(f"{path}: missing column(s) {missing}")
        raw["flag"] = raw["flag"].astype(int)
        target = raw["phecode_unrolled"] if version == "1.2" else raw["phecode"]  # X lists every level as rows
        pairs = pd.DataFrame({"icd": raw["ICD"].str.upper(), "flag": raw["flag"], "phecode": target}).drop_duplicates()
        mapping = {(icd, int(flag)): tuple(sorted(g)) for (icd, flag), g in pairs.groupby(["icd", "flag"])["phecode"]}
        return cls(version, mapping, _phecode_info(raw, version))

    def codes(self, version: int) -> frozenset[str]:
        if version not in self._codes_by_version:
            self._codes_by_version[version] = frozenset(icd for icd, v in self.icd_to_phecodes if v == version)
        return self._codes_by_version[version]

    def lookup(self, code: str, version: int) -> tuple[tuple[str, ...], str, str]:
        """Undotted or dotted ICD -> (phecodes, matched ICD, how: 'exact'/'trimmed'/'unmapped'/'malformed')."""
        try:
            dotted = dot_icd(code, version)
        except PhecodeError:
            return (), "", "malformed"
        if icd_chapter(dotted, version) == "malformed":
            return (), "", "malformed"
        known = self.codes(version)
        candidate, how = dotted, "exact"
        while candidate:
            if candidate in known:
                return self.icd_to_phecodes[(candidate, version)], candidate, how
            candidate = candidate[:-1].rstrip(".")
            how = "trimmed"
            if len(candidate) < 3:
                break
        return (), "", "unmapped"

    def map_diagnoses(self, diagnoses: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """diagnoses (hadm_id, icd_code, icd_version) -> (admission x phecode pairs, per-row mapping detail)."""
        for col in ("hadm_id", "icd_code", "icd_version"):
            if col not in diagnoses.columns:
                raise PhecodeError(f"diagnoses table lacks column {col!r} (MIMIC-IV hosp/diagnoses_icd)")
        versions = pd.to_numeric(diagnoses["icd_version"], errors="coerce")
        unique = pd.DataFrame(
            {"icd_code": diagnoses["icd_code"].astype(str).str.strip(), "icd_version": versions}
        ).drop_duplicates()
        rows = []
        for code, version in zip(unique["icd_code"], unique["icd_version"], strict=True):
            v = int(version) if version in (9, 10) else -1
            phecodes, matched, how = self.lookup(code, v) if v > 0 else ((), "", "malformed")
            rows.append((code, version, matched, how, phecodes, icd_chapter(code, v) if v > 0 else "malformed"))
        lookup = pd.DataFrame(rows, columns=["icd_code", "icd_version", "matched_icd", "match", "phecodes", "chapter"])
        detail = pd.DataFrame(
            {
                "hadm_id": diagnoses["hadm_id"].to_numpy(),
                "icd_code": diagnoses["icd_code"].astype(str).str.strip().to_numpy(),
                "icd_version": versions.to_numpy(),
            }
        ).merge(lookup, on=["icd_code", "icd_version"], how="left")
        pairs = detail[["hadm_id", "phecodes"]].explode("phecodes").dropna().rename(columns={"phecodes": "phecode"})
        return pairs.drop_duplicates().reset_index(drop=True), detail


def _phecode_info(raw: pd.DataFrame, version: PhecodeVersion) -> pd.DataFrame:
    cols = ["phecode", "phecode_string", "phecode_category", "sex"]
    leaf = raw[cols + (["exclude_range"] if "exclude_range" in raw.columns else [])].drop_duplicates("phecode")
    leaf = leaf.set_index("phecode")
    if version == "1.2":  # parents reached only by roll-up: take the info of their shortest descendant
        parents = raw.loc[~raw["phecode_unrolled"].isin(leaf.index)].copy()
        parents["depth"] = parents["phecode"].str.len()
        parents = parents.sort_values(["phecode_unrolled", "depth", "phecode"]).drop_duplicates("phecode_unrolled")
        extra = parents.set_index("phecode_unrolled")[leaf.columns]
        leaf = pd.concat([leaf, extra])
    exclude = leaf["exclude_range"] if "exclude_range" in leaf.columns else pd.Series("", index=leaf.index)
    leaf["exclude_range"] = [
        tuple(sorted(p.strip() for p in str(e).split(",") if p.strip())) for e in exclude.fillna("")
    ]
    leaf.index.name = "phecode"
    return leaf.sort_index()


@dataclass
class MappingReport:
    """How well the billed rows mapped: per version, per chapter, and outside the supplementary chapters."""

    by_version: pd.DataFrame
    by_chapter: pd.DataFrame
    rate_outside_supplementary: float
    unmapped_codes: pd.DataFrame  # code, version, chapter, rows (the most frequent first)


def mapping_report(detail: pd.DataFrame) -> MappingReport:
    d = detail.assign(
        mapped=detail["match"].isin(["exact", "trimmed"]),
        exact=detail["match"].eq("exact"),
        trimmed=detail["match"].eq("trimmed"),
    )

    def summarise(g: pd.core.groupby.DataFrameGroupBy) -> pd.DataFrame:
        out = g.agg(
            rows=("mapped", "size"), mapped=("mapped", "sum"), exact=("exact", "sum"), trimmed=("trimmed", "sum")
        )
        out["mapping_rate"] = out["mapped"] / out["rows"]
        return out.reset_index()

    by_version = summarise(d.groupby("icd_version"))
    by_chapter = summarise(d.groupby(["icd_version", "chapter"]))
    core = d[~d["chapter"].isin(SUPPLEMENTARY)]
    rate = float(core["mapped"].mean()) if len(core) else float("nan")
    unmapped = (
        d[~d["mapped"]]
        .groupby(["icd_code", "icd_version", "chapter", "match"])
        .size()
        .rename("rows")
        .reset_index()
        .sort_values("rows", ascending=False)
    )
    return MappingReport(by_version, by_chapter, rate, unmapped)


@dataclass
class PhecodeStatus:
    """Per analysis unit (a subject) and phecode: 1 case, 0 control, -1 excluded (exclusion range or other sex)."""

    status: np.ndarray  # (n_units, n_phecodes) int8
    phecodes: pd.DataFrame  # phecode, phecode_string, phecode_category, sex, n_cases, n_controls, n_excluded, ...
    untested: pd.DataFrame  # phecode, phecode_string, phecode_category, reason, same_cases_as


def phecode_status(
    admissions: pd.Series,
    pairs: pd.DataFrame,
    phecode_map: PhecodeMap,
    male: np.ndarray,
    min_cases: int = 20,
    min_controls: int = 20,
    unit_of: np.ndarray | None = None,
) -> PhecodeStatus:
    """Cases, controls and exclusions for every phecode seen in the cohort's codes.

    admissions: the cohort's hadm_ids in row order; male: (n,) bool. `unit_of` (n,): the analysis unit
    (subject) of each admission, 0..U-1, when a subject contributes several admissions: a subject is a
    case when any of its admissions has the phecode, excluded when it is not a case and any admission
    has a code of the exclusion range; rows of the result are then subjects. Minimums count units, so
    always distinct subjects. A phecode is tested only with >= min_cases cases and >= min_controls
    controls; the others are listed with the reason.

    Phecodes with the same case set (a parent whose only cases are those of one child: 427, 427.2,
    427.21) are one condition in this cohort: only the most specific is tested, and the others are
    listed as untested with `same_cases_as` naming it (and in its `same_cases` column), so a hit is
    counted and shown once.
    """
    row_of = pd.Series(np.arange(len(admissions)), index=pd.Index(admissions.to_numpy()))
    pairs = pairs[pairs["hadm_id"].isin(row_of.index)]
    seen = sorted(set(pairs["phecode"]))
    info = phecode_map.info
    unknown = [p for p in seen if p not in info.index]
    if unknown:
        raise PhecodeError(f"phecodes {unknown[:5]} are in the map's roll-up but have no info row")
    col_of = {p: j for j, p in enumerate(seen)}
    has = np.zeros((len(admissions), len(seen)), dtype=bool)
    has[row_of[pairs["hadm_id"]].to_numpy(), [col_of[p] for p in pairs["phecode"]]] = True
    male = np.asarray(male, dtype=bool)
    if unit_of is not None:
        unit_of = np.asarray(unit_of)
        if len(unit_of) != len(admissions):
            raise ValueError(f"unit_of has {len(unit_of)} entries for {len(admissions)} admissions")
        n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
        pooled = np.zeros((n_units, len(seen)), dtype=bool)
        np.logical_or.at(pooled, unit_of, has)
        unit_male = np.zeros(n_units, dtype=bool)
        unit_male[unit_of] = male
        has, male = pooled, unit_male

    status = has.astype(np.int8)
    restricted: dict[str, str] = {}  # phecode -> the one sex of all its cases
    for j, p in enumerate(seen):
        ex = [col_of[e] for e in info.at[p, "exclude_range"] if e in col_of and e != p]
        if ex:
            status[~has[:, j] & has[:, ex].any(axis=1), j] = -1
        sex = info.at[p, "sex"]
        cases_male = male[has[:, j]]
        one_sex = cases_male.all() or not cases_male.any()
        if sex not in ("Male", "Female") and len(cases_male) >= min_cases and one_sex:
            # A "Both" phecode whose cases are all of one sex (a breast cancer parent code, say): the other
            # sex cannot inform it and would leave sex confounded, so it leaves the cohort as for 174.11.
            sex = "Male" if cases_male.all() else "Female"
            restricted[p] = sex
        if sex in ("Male", "Female"):
            status[male != (sex == "Male"), j] = -1
    table = info.loc[seen, ["phecode_string", "phecode_category", "sex"]].reset_index()
    table["sex_from_cases"] = table["phecode"].isin(restricted)  # restricted because every case is one sex
    for p, sex in restricted.items():
        table.loc[table["phecode"] == p, "sex"] = f"{sex} (all cases)"
    table["n_cases"] = (status == 1).sum(axis=0)
    table["n_controls"] = (status == 0).sum(axis=0)
    table["n_excluded"] = (status == -1).sum(axis=0)
    counted = " (distinct subjects)" if unit_of is not None else ""
    reason = np.where(
        table["n_cases"] < min_cases,
        f"fewer than {min_cases} cases{counted}",
        np.where(table["n_controls"] < min_controls, f"fewer than {min_controls} controls{counted}", ""),
    )
    same_as = _same_case_sets(table["phecode"].to_numpy(), status == 1, reason == "")
    codes = table["phecode"].to_numpy()
    table["same_cases"] = [", ".join(sorted(codes[same_as == c])) for c in codes]
    reason = np.where(same_as != "", "same cases as " + same_as.astype(str), reason)
    table["tested"] = reason == ""
    untested = table.loc[~table["tested"], ["phecode", "phecode_string", "phecode_category"]].assign(
        reason=reason[~table["tested"].to_numpy()], same_cases_as=same_as[~table["tested"].to_numpy()]
    )
    keep = table["tested"].to_numpy()
    return PhecodeStatus(
        status[:, keep], table.loc[keep].drop(columns="tested").reset_index(drop=True), untested.reset_index(drop=True)
    )


def _same_case_sets(codes: np.ndarray, cases: np.ndarray, testable: np.ndarray) -> np.ndarray:
    """For each phecode, the testable phecode with the same case set that is kept in its place ('' for
    the kept ones and those without a twin): the most specific (longest code), then the first."""
    out = np.full(len(codes), "", dtype=object)
    groups: dict[bytes, list[int]] = {}
    for j in np.flatnonzero(testable):
        groups.setdefault(np.packbits(cases[:, j]).tobytes(), []).append(j)
    for members in groups.values():
        if len(members) > 1:
            kept = max(members, key=lambda j: (len(str(codes[j])), -j))
            for j in members:
                if j != kept:
                    out[j] = str(codes[kept])
    return out
