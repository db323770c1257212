"""Phenotype association: phecode mapping, cohort linking, the engine against statsmodels, planted
associations recovered on the demo cohort, and the credentialed-data rules on what reaches MLflow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import optimize

from ecgproto.data.demo.cohort import NULL, PLANTED
from ecgproto.phenotype.cohort import CohortConfig, link_ecgs
from ecgproto.phenotype.engine import (
    AssociationEngine,
    EngineConfig,
    FeatureSet,
    bh_fdr,
    firth_logit,
)
from ecgproto.phenotype.phecodes import (
    PhecodeMap,
    PhecodeStatus,
    dot_icd,
    mapping_report,
    phecode_status,
)

# Demo report phrases of each planted ECG pattern (what the NLP concept features see).
PATTERN_PHRASE = {
    "AFIB": "atrial fibrillation",
    "LVH": "left ventricular hypertrophy",
    "STACH": "sinus tachycardia",
    "IMI": "inferior infarct",
}


@pytest.fixture(scope="module")
def phecode12() -> PhecodeMap:
    return PhecodeMap.load("1.2")


def test_undotted_mimic_codes_get_their_dot_back() -> None:
    assert dot_icd("42731", 9) == "427.31"
    assert dot_icd("E8497", 9) == "E849.7"  # ICD-9 E codes: after the 4th character
    assert dot_icd("V5861", 9) == "V58.61"
    assert dot_icd("I480", 10) == "I48.0"
    assert dot_icd("R6520", 10) == "R65.20"
    assert dot_icd("412", 9) == "412"  # 3 characters: nothing to insert


@pytest.mark.parametrize(
    ("code", "version", "leaf", "rolled"),
    [
        ("42731", 9, "427.21", {"427.2", "427"}),
        ("I480", 10, "427.21", {"427.2", "427"}),
        ("4280", 9, "428.1", {"428"}),
        ("I509", 10, "428.1", {"428"}),
        ("R6520", 10, "994.2", {"994"}),
        ("99591", 9, "994.2", {"994"}),
        ("N179", 10, "585.1", {"585"}),
        ("5849", 9, "585.1", {"585"}),
    ],
)
def test_spec_check_codes_map_to_their_phecode_and_roll_up(
    phecode12: PhecodeMap, code: str, version: int, leaf: str, rolled: set[str]
) -> None:
    phecodes, _, how = phecode12.lookup(code, version)
    assert how == "exact"
    assert set(phecodes) == {leaf} | rolled


def test_unmatched_codes_fall_back_by_trimming_and_malformed_codes_are_reported(phecode12: PhecodeMap) -> None:
    phecodes, matched, how = phecode12.lookup("I48911", 10)  # a 7th character the map does not list
    assert how == "trimmed" and matched == "I48.91" and "427.21" in phecodes
    dx = pd.DataFrame(
        {
            "hadm_id": [1, 1, 2, 2, 3, 3],
            "icd_code": ["42731", "XYZ", "I509", "", "E8497", "4019"],
            "icd_version": [9, 10, 10, 10, 9, 7],
        }
    )
    pairs, detail = phecode12.map_diagnoses(dx)
    assert detail["match"].tolist() == ["exact", "malformed", "exact", "malformed", "unmapped", "malformed"]
    report = mapping_report(detail)
    assert set(report.unmapped_codes["icd_code"]) == {"XYZ", "", "E8497", "4019"}
    assert report.rate_outside_supplementary == pytest.approx(2 / 5)  # the E code's chapter is left out by design
    assert set(pairs.loc[pairs["hadm_id"] == 1, "phecode"]) == {"427", "427.2", "427.21"}


def test_exclusion_ranges_and_sex_restrictions_shape_the_controls(phecode12: PhecodeMap) -> None:
    dx = pd.DataFrame(
        {
            "hadm_id": [1, 2, 3, 4, 5],
            "icd_version": 9,  # AF, flutter, prostate cancer, HTN, AF
            "icd_code": ["42731", "42732", "185", "4019", "42731"],
        }
    )
    pairs, _ = phecode12.map_diagnoses(dx)
    male = np.array([True, False, True, False, False])
    st = phecode_status(pd.Series([1, 2, 3, 4, 5]), pairs, phecode12, male, min_cases=1, min_controls=1)
    col = {p: j for j, p in enumerate(st.phecodes["phecode"])}
    table = st.phecodes.set_index("phecode")
    assert st.status[:, col["427.21"]].tolist() == [1, -1, 0, 0, 1]  # flutter is in AF's exclusion range
    assert st.status[:, col["185"]].tolist() == [0, -1, 1, -1, -1]  # male-only phecode: women leave the cohort
    assert table.loc["185", "sex"] == "Male" and not table.loc["185", "sex_from_cases"]
    # hypertension is a "Both" phecode, but its only case is a woman: the men cannot inform it
    assert st.status[:, col["401.1"]].tolist() == [-1, 0, -1, 1, 0] and table.loc["401.1", "sex_from_cases"]
    assert table.loc["401.1", "sex"] == "Female (all cases)"


def test_phecodes_below_the_case_minimum_are_listed_as_untested_with_the_reason(phecode12: PhecodeMap) -> None:
    dx = pd.DataFrame({"hadm_id": np.arange(30), "icd_version": 9, "icd_code": ["4019"] * 25 + ["42731"] * 5})
    pairs, _ = phecode12.map_diagnoses(dx)
    st = phecode_status(pd.Series(np.arange(30)), pairs, phecode12, np.ones(30, bool), min_cases=10, min_controls=3)
    assert "401.1" in set(st.phecodes["phecode"])
    untested = st.untested.set_index("phecode")
    assert untested.loc["427.21", "reason"] == "fewer than 10 cases"


def test_ecgs_link_to_admissions_by_window_earliest_first_and_overlaps_resolved() -> None:
    adm = pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "hadm_id": [10, 11, 20],
            "admittime": ["2150-01-10", "2150-01-20", "2150-03-01"],
            "dischtime": ["2150-01-15", "2150-01-25", "2150-03-05"],
        }
    )
    ecgs = pd.DataFrame(
        {
            "record_id": ["a", "b", "c", "d", "e"],
            "subject_id": [1, 1, 1, 2, 2],
            "row": range(5),
            "ecg_time": ["2150-01-09", "2150-01-12", "2150-01-16", "2150-02-01", "2150-03-02"],
        }
    )
    linked = link_ecgs(ecgs, adm, CohortConfig()).set_index("hadm_id")
    assert linked.loc[10, "record_id"] == "a"  # one day before admission counts; the earliest wins over b
    assert linked.loc[11, "record_id"] == "c"  # after discharge of 10, within 7 days before 11
    assert linked.loc[20, "record_id"] == "e"  # d is 4 weeks early: outside every window
    strict = link_ecgs(ecgs, adm, CohortConfig(strict=True)).set_index("hadm_id")
    assert strict.loc[10, "record_id"] == "b" and 11 not in strict.index


def _synthetic(seed: int = 0, n: int = 3000, m: int = 40, J: int = 12, whole_years: bool = False) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    age, male = rng.uniform(20, 90, n), rng.random(n) < 0.5
    if whole_years:  # as MIMIC gives ages: the null fits pool admissions by (age, sex) pattern
        age = np.floor(age)
    F = rng.normal(size=(n, m))
    F[:, 1] = rng.exponential(size=n)  # skewed, like similarity scores
    status = np.zeros((n, J), np.int8)
    for j in range(J):
        eta = -2 + 0.3 * (age - 60) / 10 + 0.3 * male + (0.6 * F[:, j] if j < 3 else 0)
        status[:, j] = rng.random(n) < 1 / (1 + np.exp(-eta))
    status[rng.random((n, J)) < 0.05] = -1
    status[~male, J - 1] = -1  # a male-only phecode
    phecodes = pd.DataFrame(
        {
            "phecode": [str(j) for j in range(J)],
            "phecode_string": "x",
            "phecode_category": "c",
            "sex": ["Both"] * (J - 1) + ["Male"],
            "n_cases": 0,
            "n_controls": 0,
            "n_excluded": 0,
        }
    )
    fs = FeatureSet(
        "f", F.astype(np.float32), pd.DataFrame({"feature_id": [str(i) for i in range(m)], "feature_label": "x"})
    )
    return SimpleNamespace(age=age, male=male, F=F, fs=fs, st=PhecodeStatus(status, phecodes, pd.DataFrame()))


@pytest.mark.parametrize("whole_years", [False, True])
def test_engine_beta_se_and_p_agree_with_statsmodels_logit(whole_years: bool) -> None:
    d = _synthetic(whole_years=whole_years)
    engine = AssociationEngine(EngineConfig(screen_p=1.0, firth_below_cases=0)).fit(d.age, d.male, d.st)
    table = engine.test(d.fs)
    assert (table["method"] == "wald").all()
    rng = np.random.default_rng(1)
    for k in rng.choice(len(table), 40, replace=False):
        row = table.iloc[k]
        i, j = int(row["feature_id"]), int(row["phecode"])
        keep = d.st.status[:, j] >= 0
        cols = [np.ones(d.age.size), d.F[:, i], (d.age - 60) / 10] + ([d.male.astype(float)] if j < 11 else [])
        fit = sm.Logit((d.st.status[keep, j] == 1).astype(float), np.column_stack(cols)[keep]).fit(disp=0, tol=1e-12)
        assert abs(fit.params[1] - row["beta"]) < 1e-6
        assert abs(fit.bse[1] - row["standard_error"]) < 1e-6
        assert abs(fit.pvalues[1] - row["p_value"]) / fit.pvalues[1] < 1e-4


def _clustered_null(phecode12: PhecodeMap, seed: int) -> SimpleNamespace:
    """Admissions nested in subjects (1-8 each), a subject-level frailty in every phecode and a subject-level
    component in every feature (so both correlate within subject), rare phecodes, and binary features
    that are 1 in every admission of 2-4% of subjects (many tables with no exposed case). No feature is
    associated with any phecode."""
    rng = np.random.default_rng(seed)
    n_subjects = 1500
    per = rng.choice([1, 1, 1, 2, 2, 3, 5, 8], n_subjects)
    subject = np.repeat(np.arange(n_subjects), per)
    n = len(subject)
    codes = [
        "250.2",
        "272.1",
        "285.1",
        "296.22",
        "300.1",
        "327.3",
        "340",
        "365",
        "401.1",
        "411.4",
        "496",
        "530.11",
        "555.2",
        "585.3",
        "599",
        "696.4",
        "714.1",
        "740.1",
    ]
    frailty = rng.normal(0, 1.5, n_subjects)[subject]
    prevalence = rng.uniform(0.0015, 0.006, len(codes))
    has = rng.random((n, len(codes))) < 1 / (1 + np.exp(-(np.log(prevalence / (1 - prevalence)) + frailty[:, None])))
    rows, cols = np.nonzero(has)
    pairs = pd.DataFrame({"hadm_id": rows, "phecode": np.asarray(codes)[cols]})
    male = (rng.random(n_subjects) < 0.5)[subject]
    age = rng.integers(20, 90, n_subjects)[subject].astype(float)
    continuous = rng.normal(size=(n_subjects, 30))[subject] + rng.normal(size=(n, 30))
    binary = (rng.random((n_subjects, 30)) < rng.uniform(0.02, 0.04, 30))[subject].astype(np.float32)
    F = np.column_stack([continuous, binary]).astype(np.float32)
    fs = FeatureSet(
        "prototype_top1", F, pd.DataFrame({"feature_id": [f"f{i}" for i in range(60)], "feature_label": "x"})
    )
    return SimpleNamespace(pairs=pairs, male=male, age=age, subject=subject, fs=fs, n_subjects=n_subjects)


def _subject_level_test(d: SimpleNamespace, phecode12: PhecodeMap, min_cases: int = 20) -> pd.DataFrame:
    """What the study does with every admission: one row per subject, features averaged, phecodes pooled.
    The table gets `exposed_cases`: case subjects with a nonzero feature."""
    from ecgproto.phenotype.study import pool_units

    status = phecode_status(
        pd.Series(np.arange(len(d.subject))), d.pairs, phecode12, d.male, min_cases, 20, unit_of=d.subject
    )
    first = np.searchsorted(d.subject, np.arange(d.n_subjects))
    engine = AssociationEngine(EngineConfig()).fit(d.age[first], d.male[first], status)
    pooled = pool_units(d.fs, d.subject, d.n_subjects)
    exposed_cases = ((pooled.values != 0).T.astype(int) @ (status.status == 1).astype(int)).ravel()
    return engine.test(pooled).assign(exposed_cases=exposed_cases)


def test_every_admission_mode_is_calibrated_on_a_clustered_null_with_rare_phecodes_and_separation(
    phecode12: PhecodeMap,
) -> None:
    p_values, separated = [], 0
    for seed in range(3):
        d = _clustered_null(phecode12, seed)
        table = _subject_level_test(d, phecode12)
        assert len(table) > 600 and table["p_value"].notna().all() and table["n_cases"].min() <= 40
        assert not table["significant_bonf"].any(), table.nsmallest(3, "p_value")
        p_values.append(table["p_value"].to_numpy())
        separated += int((table["exposed_cases"] == 0).sum())
    assert separated > 100  # binary features no case subject has
    p = np.concatenate(p_values)
    assert 0.02 <= float((p < 0.05).mean()) <= 0.08
    assert 0.001 <= float((p < 0.01).mean()) <= 0.02


def test_a_separated_table_from_repeated_admissions_is_no_stronger_than_the_exact_test(phecode12: PhecodeMap) -> None:
    """The null finding reported on the MIMIC demo: exposed admissions 0 cases / 33, unexposed 43 / 224
    (Fisher's exact p = 0.002 ignoring that admissions share subjects); a Firth fit with a sandwich
    variance gave p = 2e-18. Here the 33 exposed admissions come from 6 subjects."""
    from scipy.stats import fisher_exact

    rng = np.random.default_rng(7)
    exposed_subjects = np.repeat(np.arange(6), [8, 7, 6, 5, 4, 3])  # 33 admissions
    unexposed_subjects = 6 + np.repeat(np.arange(90), rng.multinomial(224 - 90, np.ones(90) / 90) + 1)
    subject = np.concatenate([exposed_subjects, unexposed_subjects])
    n = len(subject)
    x = np.r_[np.ones(33), np.zeros(224)].astype(np.float32)
    case = np.zeros(n, bool)
    case[33 + rng.choice(224, 43, replace=False)] = True
    d = SimpleNamespace(
        pairs=pd.DataFrame({"hadm_id": np.flatnonzero(case), "phecode": "530.11"}),
        male=(rng.random(96) < 0.5)[subject],
        age=rng.integers(30, 80, 96)[subject].astype(float),
        subject=subject,
        n_subjects=96,
        fs=FeatureSet("prototype_top1", x[:, None], pd.DataFrame({"feature_id": ["P0001"], "feature_label": "x"})),
    )
    exact = fisher_exact([[0, 33], [43, 181]]).pvalue
    row = _subject_level_test(d, phecode12, min_cases=10).iloc[0]
    assert row["beta"] < 0
    assert row["p_value"] >= exact
    assert row["n_cases"] == len(np.unique(subject[case]))  # counts are subjects


def test_case_minimums_count_distinct_subjects(phecode12: PhecodeMap) -> None:
    dx = pd.DataFrame({"hadm_id": np.arange(60), "icd_version": 9, "icd_code": ["2041"] * 20 + ["4019"] * 40})
    pairs, _ = phecode12.map_diagnoses(dx)
    unit_of = np.r_[np.zeros(20, int), np.arange(1, 41), np.arange(41, 100)]  # 20 leukemia admissions, 1 subject
    st = phecode_status(pd.Series(np.arange(119)), pairs, phecode12, np.ones(119, bool), 20, 20, unit_of=unit_of)
    untested = st.untested.set_index("phecode")
    assert untested.loc["204.1", "reason"] == "fewer than 20 cases (distinct subjects)"
    assert st.phecodes.set_index("phecode").loc["401.1", "n_cases"] == 40


def test_phecodes_with_the_same_cases_are_one_condition_tested_at_the_most_specific_code(phecode12: PhecodeMap) -> None:
    dx = pd.DataFrame({"hadm_id": np.arange(60), "icd_version": 9, "icd_code": ["42731"] * 25 + ["4019"] * 35})
    pairs, _ = phecode12.map_diagnoses(dx)
    st = phecode_status(pd.Series(np.arange(80)), pairs, phecode12, np.arange(80) % 2 == 0, 10, 10)
    tested = st.phecodes.set_index("phecode")
    assert {"427.21", "401.1"} <= set(tested.index) and not {"427", "427.2", "401"} & set(tested.index)
    assert tested.loc["427.21", "same_cases"] == "427, 427.2" and tested.loc["401.1", "same_cases"] == "401"
    untested = st.untested.set_index("phecode")
    assert untested.loc["427.2", "reason"] == "same cases as 427.21"
    assert untested.loc["427", "same_cases_as"] == "427.21"


def test_cohort_leaves_out_impossible_admissions_and_unreadable_ecg_times_with_a_flow_step(tmp_path: Path) -> None:
    from ecgproto.phenotype.cohort import build_cohort

    hosp = tmp_path / "hosp"
    hosp.mkdir()
    pd.DataFrame(
        {"subject_id": [1, 2, 3], "gender": ["M", "F", "M"], "anchor_age": [60, 70, 50], "anchor_year": [2150] * 3}
    ).to_csv(hosp / "patients.csv", index=False)
    pd.DataFrame(
        {
            "subject_id": [1, 1, 2, 3],
            "hadm_id": [10, 11, 20, 30],
            "admittime": ["2150-01-10", "2150-02-10", "2150-03-01", "2150-04-01"],
            "dischtime": ["2150-01-15", "2150-02-01", "2150-03-05", "2150-04-05"],
        }
    ).to_csv(hosp / "admissions.csv", index=False)  # 11 is discharged before it is admitted
    pd.DataFrame(
        {"subject_id": [1, 1, 2, 3], "hadm_id": [10, 11, 20, 30], "icd_code": "4019", "icd_version": 9}
    ).to_csv(hosp / "diagnoses_icd.csv", index=False)
    manifest = pd.DataFrame(
        {
            "record_id": ["a", "b", "c", "d"],
            "subject_id": ["1", "1", "2", "3"],
            "row": range(4),
            "ecg_time": ["2150-01-11", "2150-02-10", "2150-03-02", "not a time"],
        }
    )
    cohort = build_cohort(manifest, hosp, CohortConfig(admissions="all"))
    assert set(cohort.table["hadm_id"]) == {10, 20}
    flow = cohort.flow.set_index("step")
    assert flow.loc["ECGs with a readable ecg_time (others left out)", "n"] == 3
    assert flow.loc["dischtime not before admittime", "n"] == 3
    assert flow.loc["subjects analysed (one row each)", "unit"] == "subjects"


def test_score_screen_refits_only_hits_and_matches_the_score_test_of_statsmodels() -> None:
    d = _synthetic(seed=2)
    table = AssociationEngine(EngineConfig(screen_p=1e-3, firth_below_cases=0)).fit(d.age, d.male, d.st).test(d.fs)
    score_rows = table[table["method"] == "score"]
    assert (score_rows["p_value"] > 1e-3).all() and (table.loc[table["method"] == "wald", "p_value"] < 1e-2).all()
    planted = table[
        (table["feature_id"].astype(int) == table["phecode"].astype(int)) & (table["phecode"].astype(int) < 3)
    ]
    assert planted["significant_bonf"].all() and (planted["beta"] > 0).all()
    for _, row in score_rows.sample(10, random_state=0).iterrows():
        i, j = int(row["feature_id"]), int(row["phecode"])
        keep = d.st.status[:, j] >= 0
        cols = [np.ones(d.age.size), (d.age - 60) / 10] + ([d.male.astype(float)] if j < 11 else [])
        null = sm.GLM(
            (d.st.status[keep, j] == 1).astype(float), np.column_stack(cols)[keep], family=sm.families.Binomial()
        ).fit()
        p = null.score_test(exog_extra=d.F[keep, i : i + 1])[1]
        assert abs(float(np.squeeze(p)) - row["p_value"]) / row["p_value"] < 1e-3


def test_firth_fit_maximises_the_penalised_likelihood_under_complete_separation() -> None:
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.08).astype(float)
    x = np.where(y == 1, 5 + rng.random(n), rng.random(n))  # cases all above every control: ML diverges
    X = np.column_stack([np.ones(n), rng.normal(size=n), x])
    beta, cov, value, converged = firth_logit(X, y)

    def negative_penalised(b: np.ndarray) -> float:
        eta = X @ b
        w = 1 / (1 + np.exp(-eta)) * (1 - 1 / (1 + np.exp(-eta)))
        return -float((y * eta - np.logaddexp(0, eta)).sum() + 0.5 * np.linalg.slogdet(X.T @ (X * w[:, None]))[1])

    reference = optimize.minimize(negative_penalised, np.zeros(3), method="BFGS", options={"gtol": 1e-10})
    assert converged and np.isfinite(beta).all()
    assert np.allclose(beta, reference.x, atol=1e-4)
    assert value == pytest.approx(-reference.fun, abs=1e-8)


def test_bh_fdr_matches_statsmodels() -> None:
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(4).uniform(size=200) ** 3
    p[5] = np.nan
    q = bh_fdr(p)
    ok = np.isfinite(p)
    assert np.allclose(q[ok], multipletests(p[ok], method="fdr_bh")[1])
    assert np.isnan(q[5])


# --- the demo cohort ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The default-size demo cohort (1,500 subjects), ingested once for this module."""
    from ecgproto.data.demo.generate import DemoConfig, generate_demo
    from ecgproto.data.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("cohort")
    demo = generate_demo(root / "demo", DemoConfig(n_ptbxl=20, n_hr=0, workers=2))
    store = ingest(demo.mimic_ecg, root / "store", IngestConfig(workers=2), progress=False).store
    return SimpleNamespace(root=root, demo=demo, store=store)


@pytest.mark.slow
def test_planted_associations_are_recovered_and_null_pairs_are_calibrated(demo_cohort: SimpleNamespace) -> None:
    from ecgproto.phenotype.study import PhenotypeStudy, StudyConfig

    config = StudyConfig(feature_sets=("nlp_concept",), predict=False)
    result = PhenotypeStudy(config).run(
        demo_cohort.store, demo_cohort.demo.mimic_hosp, None, demo_cohort.demo.mimic_ecg / "machine_measurements.csv"
    )
    r = result.results
    same = result.status.untested.set_index("phecode")["same_cases_as"]
    for dx in PLANTED:
        phrase = PATTERN_PHRASE[dx.pattern]
        code = same.get(dx.phecode) or dx.phecode  # 428 has only 428.1's cases here: tested as 428.1
        hits = r[(r["phecode"] == code) & r["feature_label"].str.startswith(phrase)]
        assert hits["significant_bonf"].any(), (dx.name, hits[["feature_label", "p_value"]])
        assert (hits.loc[hits["significant_bonf"], "beta"] > 0).all()  # right sign
    null_codes = {dx.phecode for dx in NULL}
    null = r[r["phecode"].isin(null_codes)]
    assert len(null) > 200
    share = float((null["p_value"] < 0.05).mean())
    assert 0.02 <= share <= 0.08, share


def _try_to_derive_hidden_counts(local: Path, metrics: dict[str, float]) -> None:
    """Subtract what a study exports from its totals, as a reader would: no count from 1 to 9 comes out."""

    def leftover(total: str | float, parts: pd.Series) -> int | None:
        if not str(total).replace(".0", "").isdigit() or parts.str.isdigit().all():
            return None
        return int(float(total)) - int(pd.to_numeric(parts, errors="coerce").fillna(0).sum())

    read = lambda name: pd.read_csv(local / name, dtype=str, keep_default_na=False)  # noqa: E731
    subjects = metrics.get("cohort_subjects", float("nan"))
    for _, row in read("phecodes_tested.csv").iterrows():  # cases + controls + excluded = subjects
        rest = leftover(subjects, row[["n_cases", "n_controls", "n_excluded"]])
        assert rest is None or not 0 < rest < 10, row.to_dict()
    version, chapter = read("mapping_by_version.csv"), read("mapping_by_chapter.csv")
    for _, v in version.iterrows():  # chapters add up to their version
        members = chapter[chapter["icd_version"] == v["icd_version"]]
        for col in ("rows", "mapped", "exact", "trimmed"):
            rest = leftover(v[col], members[col])
            assert rest is None or not 0 < rest < 10, (v["icd_version"], col)
    for table in (version, chapter):  # mapped = exact + trimmed
        for _, row in table.iterrows():
            rest = leftover(row["mapped"], row[["exact", "trimmed"]])
            assert rest is None or not 0 < rest < 10, row.to_dict()
    flow = read("cohort_flow.csv")
    for unit in ("ECGs", "admissions"):
        shown = [int(n) for n, u in zip(flow["n"], flow["unit"], strict=True) if u == unit and n.isdigit()]
        assert all(not 0 < a - b < 10 for i, a in enumerate(shown) for b in shown[i + 1 :]), (unit, shown)


def test_associate_flow_logs_tables_and_figures_without_identifiers_or_small_counts(
    demo_root: Path, prefect_server: None, mlflow_uri: str, tmp_path: Path
) -> None:
    from ecgproto import tracking
    from ecgproto.data.ingest import IngestConfig, ingest
    from ecgproto.flows.associate import associate_flow
    from ecgproto.phenotype.study import StudyConfig

    mimic, hosp = demo_root / "mimic-iv-ecg", demo_root / "mimic-iv" / "hosp"
    store = ingest(mimic, tmp_path / "store", IngestConfig(workers=2), progress=False).store
    config = StudyConfig(
        feature_sets=("nlp_concept",), min_cases=3, min_controls=3, targets={"401.1": "hypertension"}
    )  # a small cohort: small counts must show as <10
    out = associate_flow(
        str(store.path), str(hosp), None, str(mimic / "machine_measurements.csv"), config, tracking_uri=mlflow_uri
    )
    run = tracking.describe(str(out["run_id"]), mlflow_uri)
    assert run["status"] == "FINISHED" and run["tags"]["cohort_dataset_hash"] == store.key
    for artifact in (
        "association/results.parquet",
        "association/results.tsv",
        "association/top_hits.tsv",
        "association/phecodes_untested.csv",
        "association/mapping_by_version.csv",
        "association/cohort_flow.csv",
        "comparison/prediction_auc.csv",
        "figures/manhattan_nlp_concept.png",
        "figures/roc_curves.png",
    ):
        assert artifact in run["artifacts"], artifact
    local = Path(tracking.client(mlflow_uri).download_artifacts(str(out["run_id"]), "association", str(tmp_path)))
    results = pd.read_csv(local / "results.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(results) > 0
    assert not set(results.columns) & {"subject_id", "hadm_id", "study_id", "record_id"}
    for table in [results] + [pd.read_csv(f, dtype=str, keep_default_na=False) for f in local.glob("*.csv")]:
        for col in set(table.columns) & {"n_cases", "n_controls", "n_excluded", "n", "rows", "mapped"}:
            numeric = pd.to_numeric(table[col], errors="coerce")
            assert ((numeric >= 10) | (numeric == 0) | table[col].isin(["<10", "suppressed"])).all(), col
    assert results["n_cases"].eq("<10").any()  # 3-9 cases happen in a 40-subject cohort, and are hidden
    _try_to_derive_hidden_counts(local, run["metrics"])
    complements = sum(int((pd.read_csv(f, dtype=str) == "suppressed").sum().sum()) for f in local.glob("*.csv"))
    assert complements > 0  # in a 40-subject cohort some totals would give small counts back
    assert not out["cached"]
    again = associate_flow(
        str(store.path), str(hosp), None, str(mimic / "machine_measurements.csv"), config, tracking_uri=mlflow_uri
    )
    assert again["cached"]  # a re-run reuses the study (Prefect cache)
    assert pd.Series(again["metrics"]).equals(pd.Series(out["metrics"]))
    ids = set(pd.read_csv(mimic / "record_list.csv", dtype=str)["subject_id"])
    text = "".join(p.read_text() for p in local.glob("*.tsv")) + "".join(p.read_text() for p in local.glob("*.csv"))
    assert not any(i in text for i in ids)

    # What Prefect persists for its cache holds no identifiers (nor diagnosis rows)
    from dataclasses import fields

    from ecgproto.flows.associate import run_study

    persisted = run_study.fn(
        str(store.path), str(hosp), None, str(mimic / "machine_measurements.csv"), config, mlflow_uri
    )
    frames = [getattr(persisted, f.name) for f in fields(persisted)] + [persisted.cohort.table, persisted.cohort.units]
    for frame in (f for f in frames if isinstance(f, pd.DataFrame)):
        assert not set(frame.columns) & {"subject_id", "hadm_id", "record_id", "study_id", "ecg_time"}
    assert persisted.cohort.diagnoses.empty and len(persisted.results) == len(results)

    # A cohort too small for any phecode: a finished run that says so, with the cohort flow and the untested list
    small = StudyConfig(feature_sets=("nlp_concept",), min_cases=500, min_controls=3, predict=False)
    out = associate_flow(
        str(store.path), str(hosp), None, str(mimic / "machine_measurements.csv"), small, tracking_uri=mlflow_uri
    )
    run = tracking.describe(str(out["run_id"]), mlflow_uri)
    assert run["status"] == "FINISHED"
    for artifact in (
        "association/nothing_tested.json",
        "association/phecodes_untested.csv",
        "association/cohort_flow.csv",
    ):
        assert artifact in run["artifacts"], artifact
    assert out["metrics"]["phecodes_tested"] == 0


def test_the_prototype_spread_comparison_holds_when_every_class_keeps_one_distinct_case() -> None:
    """After the near-duplicate merge a class may keep a single prototype: the mixed-vs-uniform
    spread comparison then has nothing to compare and says so, instead of failing the study."""
    from ecgproto.phenotype import compare

    table = pd.DataFrame({"branch": ["rhythm_1d", "rhythm_1d"], "class": ["AFIB", "NORM"], "prototype": [0, 1]})
    distances = compare.intra_class_distance(np.eye(2), table)
    assert distances.empty and "prototype_class" in distances.columns
    results = pd.DataFrame(
        {
            "feature_set": ["prototype", "prototype"],
            "prototype_class": ["AFIB", "NORM"],
            "phecode": ["427.2", "427.2"],
            "significant_bonf": [True, False],
        }
    )
    merged, summary = compare.mixed_significance_test(results, distances)
    assert merged.empty
    assert summary["mixed_classes"] == 0 and np.isnan(summary["mannwhitney_p"])


def test_the_nothing_testable_message_names_the_cohort_step_that_removed_the_cohort() -> None:
    """Every admission discharged before it was admitted (a unit or export error): the message says so."""
    from ecgproto.phenotype.study import _largest_loss

    flow = pd.DataFrame(
        [
            ("ECGs in the store", 4000, "ECGs"),
            ("admissions in hosp", 900, "admissions"),
            ("with readable admittime and dischtime", 900, "admissions"),
            ("dischtime not before admittime", 0, "admissions"),
            ("with a usable ECG in the window", 0, "admissions"),
            ("subjects analysed (one row each)", 0, "subjects"),
        ],
        columns=["step", "n", "unit"],
    )
    text = _largest_loss(flow)
    assert "'dischtime not before admittime'" in text and "every one" in text
    assert not any(ch.isdigit() for ch in text)  # counts are published in the flow table only, suppressed
    assert _largest_loss(flow.assign(n=[4000, 900, 900, 880, 870, 700])) == ""  # no step took most of it
