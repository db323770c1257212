import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgproto.data.demo.faults import FAULTS, plant_faults
from ecgproto.data.demo.wfdb_writer import write_record
from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set, multi_hot, parse_scp_codes
from ecgproto.data.leads import LEADS, MIMIC_LEADS, lead_permutation
from ecgproto.data.preprocess import PreprocessConfig, highpass, resample
from tests.conftest import real_ptbxl_subset

SERIAL = IngestConfig(workers=1)


def test_every_bad_input_is_quarantined_with_its_reason_and_good_records_survive(
    ptbxl_copy: Path, tmp_path: Path
) -> None:
    expected = plant_faults(ptbxl_copy)
    assert len(expected) == len(FAULTS)
    n_rows = len(pd.read_csv(ptbxl_copy / "ptbxl_database.csv"))
    config = IngestConfig(workers=2, preprocess=PreprocessConfig(allow_resample=False))
    store = ingest(ptbxl_copy, tmp_path / "store", config, progress=False).store
    q = store.quarantine
    got = dict(zip(q["record_id"], q["reason"], strict=True))
    assert got == expected
    duplicate = next(k for k, v in expected.items() if v == "duplicate_id")
    assert (q["record_id"] == duplicate).sum() == 2  # both rows of a duplicated id, nothing silently kept
    assert len(store.manifest) + len(q) == n_rows  # nothing lost
    assert not set(store.manifest["record_id"]) & set(expected)
    for _, row in q.iterrows():  # the user sees the file and what to do
        assert row["file"] and row["message"]
    truncated = q[q["reason"] == "truncated_dat"].iloc[0]
    assert truncated["file"].endswith(".dat") and "fetch the record again" in truncated["message"]
    # with resampling on, the 250 Hz record is usable
    resampled = ingest(ptbxl_copy, tmp_path / "store", IngestConfig(workers=1), progress=False).store
    assert "sampling_rate" not in set(resampled.quarantine["reason"])
    assert 250.0 in set(resampled.manifest["fs_in"])


def test_store_rows_equal_wfdb_read_plus_preprocessing_and_labels_follow_scp_codes(
    demo_root: Path, tmp_path: Path
) -> None:
    store = ingest(demo_root / "ptbxl", tmp_path, SERIAL, progress=False).store
    db = pd.read_csv(demo_root / "ptbxl" / "ptbxl_database.csv", dtype={"ecg_id": str}).set_index("ecg_id")
    labels = load_label_set()
    m = store.manifest.set_index("record_id")
    for record_id in ["1", "17", "120"]:
        raw, fields = wfdb.rdsamp(str(demo_root / "ptbxl" / db.loc[record_id, "filename_lr"]))
        expected = highpass(raw[:, lead_permutation(fields["sig_name"])].T, 100, 0.5)
        row = m.loc[record_id, "row"]
        np.testing.assert_allclose(store.signals[row], expected, atol=1e-5)
        assert (store.labels[row] == multi_hot(parse_scp_codes(db.loc[record_id, "scp_codes"]), labels)).all()
    split = {f: s for f, s in zip(m["strat_fold"], m["split"], strict=True)}
    assert all(split[f] == "train" for f in range(1, 9)) and split[9] == "val" and split[10] == "test"


def test_mimic_layout_planted_avl_spike_lands_in_avl_at_its_time(tmp_path: Path) -> None:
    root = tmp_path / "mimic-iv-ecg"
    t = np.arange(5000) / 500
    x = np.zeros((5000, 12))
    x[:, :] = 0.05 * np.sin(2 * np.pi * 1.1 * t)[:, None] * np.arange(1, 13)  # every lead alive, distinct
    x[:, LEADS.index("aVL")] += 2.0 * np.exp(-0.5 * ((t - 3.0) / 0.012) ** 2)
    mimic_order = [LEADS.index(lead) for lead in MIMIC_LEADS]
    rel = "files/p1000/p10000001/s40000001/40000001"
    write_record(root / rel, x[:, mimic_order], 500, list(MIMIC_LEADS), adc_gain=200.0)
    pd.DataFrame(
        [
            {
                "subject_id": 10000001,
                "study_id": 40000001,
                "file_name": f"mimic-iv-ecg/{rel}",
                "ecg_time": "2180-01-01 10:00:00",
                "path": rel,
            }
        ]
    ).to_csv(root / "record_list.csv", index=False)
    store = ingest(root, tmp_path / "store", SERIAL, progress=False).store
    assert store.info["layout"] == "mimic_ecg" and store.info["credentialed"]
    sig = store.signals[store.manifest["row"].iloc[0]]  # (12, 1000) at 100 Hz
    assert sig.shape == (12, 1000)
    assert int(np.argmax(sig[LEADS.index("aVL")])) == 300
    assert sig[LEADS.index("aVL")].max() > 1.0
    assert sig[LEADS.index("aVF")].max() < 0.5  # the lead MIMIC stores in aVL's slot did not get it


def test_rerun_with_same_inputs_is_a_cache_hit_and_a_changed_file_is_not(
    demo_root: Path, ptbxl_copy: Path, tmp_path: Path
) -> None:
    first = ingest(ptbxl_copy, tmp_path, IngestConfig(workers=2), progress=False)
    t0 = time.perf_counter()
    again = ingest(ptbxl_copy, tmp_path, IngestConfig(workers=2), progress=False)
    assert again.cache_hit and again.store.path == first.store.path
    assert time.perf_counter() - t0 < 5
    dat = next((ptbxl_copy / "records100").glob("*/*.dat"))
    os.utime(dat, ns=(dat.stat().st_atime_ns, dat.stat().st_mtime_ns + 10**9))
    changed = ingest(ptbxl_copy, tmp_path, IngestConfig(workers=2), progress=False)
    assert not changed.cache_hit and changed.store.path != first.store.path
    other_config = ingest(
        ptbxl_copy, tmp_path, IngestConfig(workers=2, preprocess=PreprocessConfig(highpass_hz=None)), progress=False
    )
    assert not other_config.cache_hit


def test_killed_ingest_leaves_no_store_and_the_next_run_resumes_to_the_same_result(
    demo_root: Path, tmp_path: Path
) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        import ecgproto.data.ingest as ing
        real, done = ing.ingest_chunk, []
        def dying(chunk):
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup runs
            done.append(real(chunk))
            return done[-1]
        ing.ingest_chunk = dying
        ing.ingest({str(demo_root / "ptbxl")!r}, {str(tmp_path / "killed")!r},
                   ing.IngestConfig(workers=1, chunk_size=20), progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    killed = tmp_path / "killed"
    assert not [p for p in killed.iterdir() if not p.name.startswith(".")]  # no published store
    partial = next(killed.glob(".partial-*"))
    assert len(list((partial / "chunks").glob("*.json"))) == 2

    resumed = ingest(demo_root / "ptbxl", killed, IngestConfig(workers=1, chunk_size=20), progress=False)
    assert resumed.resumed_chunks == 2 and not resumed.cache_hit
    assert not partial.exists()
    clean = ingest(demo_root / "ptbxl", tmp_path / "clean", IngestConfig(workers=1, chunk_size=20), progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.store.signals), np.asarray(clean.store.signals))
    pd.testing.assert_frame_equal(resumed.store.manifest, clean.store.manifest)


def test_parallel_and_serial_ingest_give_identical_stores(demo_root: Path, tmp_path: Path) -> None:
    a = ingest(demo_root / "ptbxl", tmp_path / "a", IngestConfig(workers=1), progress=False).store
    b = ingest(demo_root / "ptbxl", tmp_path / "b", IngestConfig(workers=2, chunk_size=16), progress=False).store
    np.testing.assert_array_equal(np.asarray(a.signals), np.asarray(b.signals))
    pd.testing.assert_frame_equal(a.manifest, b.manifest)


@pytest.mark.real_data
def test_real_ptbxl_subset_ingests_without_quarantine(tmp_path: Path) -> None:
    root = real_ptbxl_subset()
    if root is None:
        pytest.skip("real PTB-XL subset not unpacked (set ECGPROTO_PTBXL_SUBSET)")
    result = ingest(root, tmp_path, IngestConfig(workers=2), progress=False)
    store = result.store
    assert len(store.manifest) == 1250 and len(store.quarantine) == 0
    assert store.signals.shape == (1250, 12, 1000)
    norm = load_label_set().index["NORM"]
    assert 0.3 < np.asarray(store.labels)[:, norm].mean() < 0.6  # PTB-XL: 43.6% NORM
    hr = ingest(root, tmp_path, IngestConfig(workers=2, preprocess=PreprocessConfig(fs=500)), progress=False).store
    # the 500 Hz model rate reads records500; only 50 are present, the rest are quarantined as missing
    assert len(hr.manifest) == 50 and set(hr.quarantine["reason"]) == {"missing_header"}
    first = hr.manifest.iloc[0]
    lr_row = store.manifest.set_index("record_id").loc[first["record_id"], "row"]
    down = resample(np.asarray(hr.signals[first["row"]]).T, 500, 100)  # (1000, 12)
    assert np.corrcoef(down[:, 1], store.signals[lr_row][1])[0, 1] > 0.95  # same ECG, lead II


def test_bad_cells_and_paths_outside_the_dataset_quarantine_their_record_only(ptbxl_copy: Path, tmp_path: Path) -> None:
    index = ptbxl_copy / "ptbxl_database.csv"
    db = pd.read_csv(index, dtype=str, keep_default_na=False)
    n_rows = len(db)
    ids = db["ecg_id"].tolist()
    db.loc[0, "scp_codes"] = "{'NORM': " + "1" * 100_000 + "}"  # a 100,000-character cell
    db.loc[1, "scp_codes"] = "{'NORM': " + "1+" * 900 + "1}"  # short, but nested too deep for the parser
    outside = tmp_path / "outside"
    outside.mkdir()
    record = Path(db.loc[4, "filename_lr"]).name
    for ext in (".hea", ".dat"):  # a valid WFDB record, but not in the dataset folder
        (outside / (record + ext)).write_bytes((ptbxl_copy / (db.loc[4, "filename_lr"] + ext)).read_bytes())
    db.loc[4, "filename_lr"] = os.path.relpath(outside / record, ptbxl_copy)  # ../outside/<record>
    db.loc[5, "filename_lr"] = str(outside / record)  # an absolute path
    db.to_csv(index, index=False)
    lines = index.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",\xe9", 1)  # a latin-1 byte in the record's first text cell (row 2)
    lines[4] = lines[4] + b",an extra field"  # a ragged row (row 3)
    index.write_bytes(b"\n".join(lines))

    store = ingest(ptbxl_copy, tmp_path / "store", SERIAL, progress=False).store
    q = store.quarantine.set_index("record_id")
    assert q.loc[ids[0], "reason"] == "malformed_scp_codes" and "100,0" in q.loc[ids[0], "message"]
    assert q.loc[ids[1], "reason"] == "malformed_scp_codes" and "dict literal" in q.loc[ids[1], "message"]
    assert q.loc[ids[2], "reason"] == "bad_encoding" and "UTF-8" in q.loc[ids[2], "message"]
    assert q.loc[ids[3], "reason"] == "ragged_row" and "fields" in q.loc[ids[3], "message"]
    assert q.loc[ids[4], "reason"] == "outside_root" and q.loc[ids[5], "reason"] == "outside_root"
    assert len(store.manifest) + len(store.quarantine) == n_rows  # every other record is in the store
    allowed = ingest(
        ptbxl_copy, tmp_path / "store", IngestConfig(workers=1, allow_outside_root=True), progress=False
    ).store
    assert {ids[4], ids[5]} <= set(allowed.manifest["record_id"]), allowed.quarantine.to_string()


def test_a_killed_parallel_ingest_leaves_no_orphan_workers_and_no_lock(demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL of the main process while its pool workers are busy: the workers die with it, the next
    ingest of the same folder does not wait on a lock, resumes and builds the same store."""
    pids = tmp_path / "pids"
    pids.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, time
        import ecgproto.data.ingest as ing
        real = ing.ingest_chunk
        def busy(chunk):
            (__import__('pathlib').Path({str(pids)!r}) / str(os.getpid())).touch()
            if chunk.index == 4:
                os.kill(os.getppid(), signal.SIGKILL)  # the main process dies; this worker is mid-chunk
                time.sleep(60)  # an orphan would keep running (and holding the lock) this long
            return real(chunk)
        ing.ingest_chunk = busy
        ing.ingest({str(demo_root / "ptbxl")!r}, {str(tmp_path / "killed")!r},
                   ing.IngestConfig(workers=2, chunk_size=20, start_method="fork"), progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    workers = [int(p.name) for p in pids.iterdir()]
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        alive = [
            p
            for p in alive
            if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
        ]
        time.sleep(0.1)
    assert not alive, f"orphan workers still running: {alive}"
    start = time.time()
    resumed = ingest(demo_root / "ptbxl", tmp_path / "killed", IngestConfig(workers=2, chunk_size=20), progress=False)
    assert time.time() - start < 60 and resumed.resumed_chunks > 0
    clean = ingest(demo_root / "ptbxl", tmp_path / "clean", IngestConfig(workers=1, chunk_size=20), progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.store.signals), np.asarray(clean.store.signals))


def test_headers_and_links_that_lead_outside_the_dataset_are_quarantined_as_outside_root(
    ptbxl_copy: Path, tmp_path: Path
) -> None:
    """Every file a record reads is resolved, symlinks followed: a record whose .hea and .dat are links to files
    elsewhere, a header whose signal-file field is absolute, and one whose field climbs out with '../'."""
    db = pd.read_csv(ptbxl_copy / "ptbxl_database.csv", dtype=str, keep_default_na=False)
    ids = db["ecg_id"].tolist()
    outside = tmp_path / "outside"
    outside.mkdir()
    base = [ptbxl_copy / db.loc[i, "filename_lr"] for i in range(3)]
    # 0: both files are links to copies outside the folder
    for ext in (".hea", ".dat"):
        target = outside / f"linked{ext}"
        target.write_bytes(base[0].with_suffix(ext).read_bytes())
        base[0].with_suffix(ext).unlink()
        base[0].with_suffix(ext).symlink_to(target)
    # 1: the header names an absolute signal file; 2: one reached with '../'
    secret = outside / "secret.dat"
    secret.write_bytes(base[1].with_suffix(".dat").read_bytes())
    for record, name in ((base[1], str(secret)), (base[2], os.path.relpath(secret, base[2].parent))):
        hea = record.with_suffix(".hea")
        dat_name = record.name + ".dat"
        hea.write_text(hea.read_text().replace(dat_name, name))
    store = ingest(ptbxl_copy, tmp_path / "store", SERIAL, progress=False).store
    q = store.quarantine.set_index("record_id")
    for i in range(3):
        assert q.loc[ids[i], "reason"] == "outside_root", q.loc[ids[i]].to_dict()
    assert "link" in q.loc[ids[0], "message"] and "--allow-outside-root" in q.loc[ids[1], "message"]
    allowed = ingest(ptbxl_copy, tmp_path / "store", IngestConfig(workers=1, allow_outside_root=True), progress=False)
    assert set(ids[:3]) <= set(allowed.store.manifest["record_id"])


def test_a_long_record_reads_only_the_window_it_keeps_and_gives_the_same_samples(tmp_path: Path) -> None:
    from ecgproto.data.wfdb_io import read_record

    rng = np.random.default_rng(0)
    signal = np.cumsum(rng.normal(0, 0.01, (500 * 600, 12)), axis=0)  # 10 minutes at 500 Hz
    wfdb.wrsamp(
        "long",
        fs=500,
        units=["mV"] * 12,
        sig_name=list(LEADS),
        p_signal=signal,
        fmt=["16"] * 12,
        write_dir=str(tmp_path),
    )
    whole = read_record(tmp_path / "long")
    window = read_record(tmp_path / "long", seconds=11.0)
    assert window.signal.shape == (5500, 12) and whole.signal.shape == (300_000, 12)
    np.testing.assert_array_equal(window.signal, whole.signal[:5500])
    config = PreprocessConfig()
    from ecgproto.data.preprocess import prepare_record

    kept_whole, _ = prepare_record(whole, config, "long")
    kept_window, _ = prepare_record(window, config, "long")
    np.testing.assert_allclose(kept_window, kept_whole, atol=1e-6)  # the margin covers the resampler's edge
