"""Complementary suppression: no small count comes back from the totals published beside it."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ecgproto.phenotype.disclosure import protect_study_counts
from ecgproto.privacy import Disclosure


def _derive_small(values: list[int], shown: list[str], total: int) -> list[int]:
    """What subtraction gives: the total minus the shown parts, when the hidden parts are few."""
    hidden = [v for v, s in zip(values, shown, strict=True) if not s.isdigit()]
    rest = total - sum(int(s) for s in shown if s.isdigit())
    return [rest] if hidden and 0 < rest < 10 else []


def test_a_hidden_chapter_count_cannot_be_recovered_from_the_version_total() -> None:
    d = Disclosure()
    total = d.cell(500)
    chapters = [d.cell(v) for v in (2, 300, 150, 48)]
    d.total(total, chapters)
    hidden = d.protect()
    shown = d.shown(chapters, hidden)
    assert shown[0] == "<10" and sum(not s.isdigit() for s in shown) == 2 and shown[3] == "suppressed"
    assert not _derive_small([2, 300, 150, 48], shown, 500) and d.audit(hidden) == []


def test_random_tables_with_row_and_column_totals_leak_no_small_count() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        values = np.where(rng.random((4, 5)) < 0.3, rng.integers(1, 10, (4, 5)), rng.integers(10, 200, (4, 5)))
        d = Disclosure()
        cells = [[d.cell(v) for v in row] for row in values]
        rows = [d.cell(v) for v in values.sum(axis=1)]
        cols = [d.cell(v) for v in values.sum(axis=0)]
        for i in range(4):
            d.total(rows[i], cells[i])
        for j in range(5):
            d.total(cols[j], [cells[i][j] for i in range(4)])
        d.total(d.cell(int(values.sum())), rows)
        hidden = d.protect()
        assert d.audit(hidden) == []  # no small cell is determined by the published numbers
        for i in range(4):  # nor by one subtraction
            assert not _derive_small(list(values[i]), d.shown(cells[i], hidden), int(values[i].sum()))


def test_cohort_flow_steps_never_differ_by_a_small_count_and_the_analysed_total_stays() -> None:
    flow = pd.DataFrame(
        {
            "step": list("abcdefg"),
            "n": [5000, 4990, 4700, 4697, 4000, 3996, 1500],
            "unit": ["ECGs", "ECGs", "admissions", "admissions", "admissions", "admissions", "subjects"],
        }
    )
    phecodes = pd.DataFrame(
        {"phecode": ["401.1", "427.21"], "n_cases": [300, 4], "n_controls": [1195, 1490], "n_excluded": [5, 6]}
    )
    empty = pd.DataFrame(columns=["icd_version", "chapter", "rows", "mapped", "exact", "trimmed", "mapping_rate"])
    out = protect_study_counts(flow, phecodes, empty.drop(columns="chapter"), empty, pd.DataFrame(), 10)
    shown = out.flow["n"].tolist()
    assert shown[-1] == "1500" and out.cohort_subjects == 1500
    for unit in ("ECGs", "admissions"):
        visible = [int(s) for s, u in zip(shown, flow["unit"], strict=True) if u == unit and s.isdigit()]
        for a, b in itertools.combinations(visible, 2):
            assert not 0 < a - b < 10, (a, b, shown)
    af = out.phecodes.set_index("phecode").loc["427.21"]
    assert af["n_cases"] == "<10" and af["n_excluded"] == "<10"  # 4 + 6 = 10: the pair's sum may show
    assert out.leaks == []


def test_a_count_the_ingest_run_hid_is_not_recoverable_from_the_association_run() -> None:
    """A credentialed ingest of 3,632 listed records quarantines 3: it publishes 3,632 and hides the 3 and the 3,629
    stored. The association run on that store knows the listed total too; it must not publish 3,629 (or any count
    that, with 3,632, gives a number below 10)."""
    from ecgproto.data.summary import credentialed_counts
    from ecgproto.phenotype.cohort import LISTED_STEP

    ingest_shown, _ = credentialed_counts(
        {"n_listed": 3632, "n_records": 3629, "n_quarantined": 3, "n_beat_fallback": 0},
        pd.DataFrame({"reason": ["flat_lead"] * 3}),
    )
    assert ingest_shown["n_listed"] == "3632" and ingest_shown["n_quarantined"] == "<10"
    assert ingest_shown["n_records"] != "3629"
    flow = pd.DataFrame(
        {
            "step": [LISTED_STEP, "ECGs in the store", "readable ecg_time", "admissions", "in window", "analysed"],
            "n": [3632, 3629, 3629, 2100, 1800, 1500],
            "unit": ["ECGs", "ECGs", "ECGs", "admissions", "admissions", "subjects"],
        }
    )
    phecodes = pd.DataFrame({"phecode": ["401.1"], "n_cases": [300], "n_controls": [1195], "n_excluded": [5]})
    empty = pd.DataFrame(columns=["icd_version", "chapter", "rows", "mapped", "exact", "trimmed", "mapping_rate"])
    out = protect_study_counts(flow, phecodes, empty.drop(columns="chapter"), empty, pd.DataFrame(), 10)
    shown = out.flow["n"].tolist()
    assert shown[0] == "3632"  # what the ingest run already published
    published = [int(s) for s in shown[:3] if s.isdigit()] + [
        int(ingest_shown[k]) for k in ("n_listed", "n_records", "n_quarantined") if str(ingest_shown[k]).isdigit()
    ]
    for a, b in itertools.combinations(published, 2):  # every number of both runs, pairwise
        assert not 0 < abs(a - b) < 10, (a, b, shown, ingest_shown)
    assert out.leaks == []
