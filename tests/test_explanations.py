"""What an explanation shows first: the label's own cases, then what the ECG also resembles, marked as such."""

from __future__ import annotations

import numpy as np

from ecgproto.explain import evidence_order, example_cases


def test_a_labels_own_prototypes_come_first_and_other_labels_cases_follow_marked() -> None:
    contribution = np.array([0.9, 0.1, 0.5, 0.0, 0.7, 0.3])
    own = np.array([False, True, True, True, False, False])
    # the two strongest contributions belong to other labels' prototypes: shown, but after the label's own
    assert evidence_order(contribution, own, top_k=3) == [2, 1, 0, 4]
    # a prototype that adds nothing is left out, unless the label has no other own evidence
    assert evidence_order(np.array([0.0, 0.4]), np.array([True, False]), top_k=2) == [0, 1]


def test_explained_examples_include_a_local_morphology_label() -> None:
    labels = np.zeros((8, 4), dtype=np.uint8)
    labels[:6, 0] = 1  # NORM, the most frequent
    labels[[1, 6], 1] = 1  # SR
    labels[[2, 3, 7], 2] = 1  # AFIB
    labels[[4, 5], 3] = 1  # IMI, a local morphology label
    codes = ("NORM", "SR", "AFIB", "IMI")
    plain = example_cases(labels, codes, preferred=("NORM", "SR", "AFIB"), n=3)
    assert [c for _, c in plain] == ["NORM", "SR", "AFIB"]
    local = example_cases(labels, codes, preferred=("NORM", "SR", "AFIB"), n=3, include_one_of=("IMI",))
    assert [c for _, c in local] == ["NORM", "SR", "IMI"]
    assert len({r for r, _ in local}) == 3  # never the same ECG twice


def test_example_cases_explain_one_positive_ecg_per_label_planted_labels_first() -> None:
    labels = np.zeros((6, 3), dtype=np.uint8)
    labels[[0, 1, 2, 3], 0] = 1  # the most frequent
    labels[[1, 4], 1] = 1
    labels[[0], 2] = 1
    assert example_cases(labels, ("NORM", "IMI", "STE"), preferred=("STE",), n=3) == [
        (0, "STE"),
        (1, "NORM"),
        (4, "IMI"),
    ]
    assert example_cases(np.zeros((3, 2), dtype=np.uint8), ("A", "B")) == []
