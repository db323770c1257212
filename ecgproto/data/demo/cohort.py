"""Who the demo patients are: label draws with realistic co-occurrence, and the planted diagnoses.

The planted (ECG pattern -> diagnosis) associations and the null diagnoses are declared here as
data, so the ground-truth file and the generator can never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RHYTHM_LABELS = ("SR", "AFIB", "STACH", "SBRAD")
ABNORMAL = ("AFIB", "1AVB", "CLBBB", "CRBBB", "LVH", "IMI", "STD_", "STE_", "INVT", "LOWT", "PVC")


def sample_labels(rng: np.random.Generator, age: float, male: bool, boost: float = 1.0) -> set[str]:
    """PTB-XL-like label draw; `boost` scales abnormal prevalences (hospital cohorts are sicker)."""
    old = (age - 60) / 15
    p_afib = boost * 0.07 / (1 + np.exp(-old))
    u = rng.random()
    rhythm = (
        "AFIB"
        if u < p_afib
        else "STACH"
        if u < p_afib + 0.07 * boost
        else "SBRAD"
        if u < p_afib + 0.14 * boost
        else "SR"
    )
    labels = {rhythm}
    if rhythm != "AFIB" and rng.random() < 0.06 * boost:
        labels.add("1AVB")
    u = rng.random()
    if u < 0.05 * boost:
        labels.add("CLBBB")
    elif u < 0.11 * boost:
        labels.add("CRBBB")
    if rng.random() < boost * (0.12 if male else 0.08) * (1.3 if age > 60 else 0.8):
        labels.add("LVH")
    if rng.random() < 0.08 * boost:
        labels.add("IMI")
    if rng.random() < (0.3 if "LVH" in labels else 0.06 * boost):
        labels.add("STD_")
    elif rng.random() < 0.04 * boost:
        labels.add("STE_")
    if rng.random() < (0.3 if "IMI" in labels else 0.06 * boost):
        labels.add("INVT")
    elif rng.random() < 0.06 * boost:
        labels.add("LOWT")
    if rng.random() < 0.06 * boost:
        labels.add("PVC")
    if not labels & set(ABNORMAL):
        labels.add("NORM")
    return labels


@dataclass(frozen=True)
class Diagnosis:
    """One diagnosis of the demo cohort: its codes (undotted, as MIMIC stores them) and its model."""

    name: str
    phecode: str  # Phecode 1.2 the codes map to (after roll-up, the level a PheWAS tests)
    icd9: tuple[str, ...]
    icd10: tuple[str, ...]
    prevalence: float  # at the reference covariates, without the pattern
    pattern: str | None = None  # ECG label whose presence multiplies the odds
    odds_ratio: float = 1.0
    age_log_or_per_decade: float = 0.0
    male_log_or: float = 0.0
    sex: str = "Both"  # 'Male'/'Female': only drawn for that sex


PLANTED = (
    Diagnosis("atrial fibrillation", "427.21", ("42731",), ("I480", "I4891"), 0.06, "AFIB", 12.0, 0.3),
    Diagnosis("heart failure", "428", ("4280",), ("I509",), 0.08, "LVH", 5.0, 0.25),
    Diagnosis("sepsis", "994.2", ("99591",), ("R6520",), 0.08, "STACH", 5.0, 0.1),
    Diagnosis("old myocardial infarction", "411.2", ("412",), ("I252",), 0.06, "IMI", 6.0, 0.2, 0.4),
)
NULL = (
    # Renal failure depends strongly on age, as does AF: unadjusted they correlate, adjusted they don't.
    Diagnosis("acute renal failure", "585.1", ("5849",), ("N179",), 0.10, age_log_or_per_decade=0.5),
    Diagnosis("hypertension", "401.1", ("4019",), ("I10",), 0.35, age_log_or_per_decade=0.3),
    Diagnosis("type 2 diabetes", "250.2", ("25000",), ("E119",), 0.2, age_log_or_per_decade=0.15),
    Diagnosis("hyperlipidemia", "272.1", ("2724",), ("E785",), 0.25, age_log_or_per_decade=0.2, male_log_or=0.2),
    Diagnosis("COPD", "496", ("496",), ("J449",), 0.1, age_log_or_per_decade=0.2),
    Diagnosis("pneumonia", "480", ("486",), ("J189",), 0.12),
    Diagnosis("urinary tract infection", "591", ("5990",), ("N390",), 0.12, male_log_or=-0.7),
    Diagnosis("depression", "296.2", ("311",), ("F329",), 0.12, male_log_or=-0.4),
    Diagnosis("GERD", "530.11", ("53081",), ("K219",), 0.15),
    Diagnosis("hypothyroidism", "244.4", ("2449",), ("E039",), 0.1, male_log_or=-0.8),
    Diagnosis("anemia", "285", ("2859",), ("D649",), 0.15),
    Diagnosis("obesity", "278.1", ("27800",), ("E669",), 0.1),
    Diagnosis("osteoarthrosis", "740.9", ("71590",), ("M1990",), 0.08, age_log_or_per_decade=0.3),
    Diagnosis("asthma", "495", ("49390",), ("J45909",), 0.07),
    Diagnosis("tobacco use", "318", ("3051",), ("F17210",), 0.15, male_log_or=0.4),
    Diagnosis("hypokalemia", "276.14", ("2768",), ("E876",), 0.08),
    Diagnosis("hyperplasia of prostate", "600", ("60000",), ("N400",), 0.2, age_log_or_per_decade=0.5, sex="Male"),
    Diagnosis("cancer of prostate", "185", ("185",), ("C61",), 0.08, sex="Male"),
    Diagnosis("endometriosis", "615", ("6179",), ("N809",), 0.1, sex="Female"),
    Diagnosis("breast cancer", "174.11", ("1749",), ("C50919",), 0.1, sex="Female"),
)
# Codes the Phecode map leaves out by design (supplementary and external-cause chapters).
UNMAPPED = {9: ("V5861", "E8497", "V1582"), 10: ("Z7901", "Y92009", "Z87891")}


def draw_diagnoses(rng: np.random.Generator, labels: set[str], age: float, male: bool, version: int) -> list[str]:
    """ICD codes (undotted) of one admission given its ECG labels and covariates."""
    codes = []
    for dx in PLANTED + NULL:
        if dx.sex == "Male" and not male or dx.sex == "Female" and male:
            continue
        logit = (
            np.log(dx.prevalence / (1 - dx.prevalence))
            + dx.age_log_or_per_decade * (age - 60) / 10
            + dx.male_log_or * male
        )
        if dx.pattern and dx.pattern in labels:
            logit += np.log(dx.odds_ratio)
        if rng.random() < 1 / (1 + np.exp(-logit)):
            options = dx.icd9 if version == 9 else dx.icd10
            codes.append(options[int(rng.integers(len(options)))])
    extra = UNMAPPED[version]
    codes += [c for c in extra if rng.random() < 0.3]
    return codes


def ground_truth() -> dict[str, object]:
    return {
        "planted_associations": [asdict(d) for d in PLANTED],
        "null_diagnoses": [asdict(d) for d in NULL],
        "unmapped_codes": {str(k): list(v) for k, v in UNMAPPED.items()},
        "model": "logit P(dx) = logit(prevalence) + log(OR)*pattern"
        " + age_log_or_per_decade*(age-60)/10 + male_log_or*male",
    }
