import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.signal import find_peaks

from ecgproto.data.labels import BRANCHES, LabelError, load_label_set, multi_hot, parse_scp_codes
from ecgproto.data.leads import LEADS, MIMIC_LEADS, LeadError, lead_permutation
from ecgproto.data.preprocess import PreprocessConfig, highpass, prepare_record, resample
from ecgproto.data.wfdb_io import RawRecord, RecordError

LABELS = load_label_set()


def test_label_set_has_71_codes_in_three_branches_16_52_3() -> None:
    assert len(LABELS) == 71
    assert [len(LABELS.branch_indices(b)) for b in BRANCHES] == [16, 52, 3]
    assert [LABELS.codes[i] for i in LABELS.branch_indices("global_2d")] == ["DIG", "NORM", "EL"]


@given(st.dictionaries(st.sampled_from(LABELS.codes), st.sampled_from([0.0, 15.0, 50.0, 80.0, 100.0]), max_size=8))
def test_scp_codes_round_trip_to_multi_hot(codes: dict[str, float]) -> None:
    y = multi_hot(parse_scp_codes(repr(codes)), LABELS)
    assert {LABELS.codes[i] for i in np.flatnonzero(y)} == set(codes)
    strict = multi_hot(parse_scp_codes(repr(codes)), LABELS, min_likelihood=50)
    assert {LABELS.codes[i] for i in np.flatnonzero(strict)} == {c for c, v in codes.items() if v >= 50}


@pytest.mark.parametrize("text", ["{'NORM': 100.0,", "['NORM']", "", None, "{'NORM': 'yes'}", "{1: 2}"])
def test_malformed_scp_codes_raise_a_label_error(text: object) -> None:
    with pytest.raises(LabelError):
        parse_scp_codes(text)


def test_mimic_lead_order_is_reordered_by_name() -> None:
    perm = lead_permutation(list(MIMIC_LEADS))
    assert [MIMIC_LEADS[i] for i in perm] == list(LEADS)
    assert [
        ["I", "II", "III", "AVR", "AVL", "AVF", *[f"V{i}" for i in range(1, 7)]][i]
        for i in lead_permutation(["I", "II", "III", "AVR", "AVL", "AVF", *[f"V{i}" for i in range(1, 7)]])
    ][3] == "AVR"
    with pytest.raises(LeadError, match="unknown lead"):
        lead_permutation(["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "X6"])
    with pytest.raises(LeadError, match="duplicate"):
        lead_permutation(["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V5"])


def test_highpass_removes_baseline_wander_and_keeps_a_qrs_spike_in_place() -> None:
    fs, t = 100, np.arange(1000) / 100
    spike = np.exp(-0.5 * ((t - 4.0) / 0.02) ** 2)
    wander = 0.8 * np.sin(2 * np.pi * 0.1 * t) + 0.5
    y = highpass((spike + wander)[None], fs, 0.5)[0]
    assert np.argmax(y) == 400  # zero phase: no shift
    assert abs(y[400] - 1.0) < 0.1
    assert np.abs(y[(t < 3) | (t > 5)][100:-100]).max() < 0.15  # the 0.1 Hz wander is gone


def test_highpass_equals_scipys_second_order_section_filter_at_every_order() -> None:
    """The first-order filter runs in transfer-function form for speed; the store's values must not move."""
    from scipy import signal as sps

    x = np.random.default_rng(1).normal(size=(8, 12, 1000)).cumsum(axis=-1).astype(np.float32)
    for order in (1, 2, 3):
        sos = sps.butter(order, 0.5, btype="highpass", fs=100, output="sos").astype(np.float32)
        np.testing.assert_array_equal(highpass(x, 100, 0.5, order), sps.sosfiltfilt(sos, x, axis=-1))


def test_resampling_500_to_100_hz_keeps_a_planted_spike_at_its_time() -> None:
    t = np.arange(5000) / 500
    x = np.zeros((5000, 12), dtype=np.float32)
    x[:, 4] = np.exp(-0.5 * ((t - 3.0) / 0.015) ** 2)
    y = resample(x, 500, 100)
    assert y.shape == (1000, 12)
    peaks, _ = find_peaks(y[:, 4], height=0.3)
    assert list(peaks) == [300]


def test_short_nan_gaps_are_interpolated_long_ones_refused() -> None:
    rng = np.random.default_rng(0)
    sig = rng.normal(size=(1000, 12)).astype(np.float32)
    sig[100:105, 3] = np.nan
    raw = RawRecord(sig, 100.0, tuple(LEADS), ("mV",) * 12)
    x, facts = prepare_record(raw, PreprocessConfig(), "f.dat")
    assert np.isfinite(x).all() and facts["n_nonfinite_repaired"] == 5
    sig[:, 3] = np.nan
    with pytest.raises(RecordError, match="lead aVR is NaN"):
        prepare_record(RawRecord(sig, 100.0, tuple(LEADS), ("mV",) * 12), PreprocessConfig(), "f.dat")
