"""Bad-input fixtures: corrupt chosen records of a PTB-XL-layout folder in every way ingest must survive.

Each fault is what a real download or export goes wrong with; `plant_faults` returns the record id
-> quarantine reason that ingest is expected to report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ecgproto.data.demo.wfdb_writer import write_record
from ecgproto.data.wfdb_io import read_record

# fault -> the quarantine reason ingest must report for it
EXPECTED_REASON = {
    "missing_dat": "missing_dat",
    "truncated_dat": "truncated_dat",
    "signal_count_mismatch": "signal_count_mismatch",
    "unknown_lead": "lead_names",
    "missing_lead": "lead_names",
    "sampling_rate": "sampling_rate",
    "nonfinite_lead": "nonfinite_lead",
    "flat_lead": "flat_lead",
    "duplicate_id": "duplicate_id",
    "malformed_scp_codes": "malformed_scp_codes",
    "missing_header": "missing_header",
}
FAULTS = tuple(EXPECTED_REASON)


def plant_faults(root: Path, faults: tuple[str, ...] = FAULTS) -> dict[str, str]:
    """Corrupt one record per fault in the PTB-XL-layout folder `root`; returns record_id -> reason.

    The sampling-rate fault writes a 250 Hz record: quarantined only when resampling is off.
    """
    db_file = root / "ptbxl_database.csv"
    db = pd.read_csv(db_file, dtype={"ecg_id": str})
    expected: dict[str, str] = {}
    for k, fault in enumerate(faults):
        row = db.iloc[k]
        ecg_id, base = row["ecg_id"], root / row["filename_lr"]
        hea, dat = base.with_suffix(".hea"), base.with_suffix(".dat")
        if fault == "missing_dat":
            dat.unlink()
        elif fault == "missing_header":
            hea.unlink()
        elif fault == "truncated_dat":
            dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 3])
        elif fault == "signal_count_mismatch":
            lines = hea.read_text().splitlines()
            hea.write_text("\n".join(lines[:-1]) + "\n")  # declares 12, describes 11
        elif fault == "missing_lead":  # a broken exporter: V5 twice, V6 gone (wfdb itself won't write that)
            lines = hea.read_text().splitlines()
            lines[-1] = lines[-1].rsplit(" ", 1)[0] + " V5"
            hea.write_text("\n".join(lines) + "\n")
        elif fault in ("unknown_lead", "nonfinite_lead", "flat_lead", "sampling_rate"):
            raw = read_record(base)
            x, names, fs = raw.signal.astype(np.float64), list(raw.sig_names), raw.fs
            if fault == "unknown_lead":
                names[7] = "X2"
            elif fault == "nonfinite_lead":
                x[:, 4] = np.nan
            elif fault == "flat_lead":
                x[:, 9] = 0.0
            elif fault == "sampling_rate":
                from scipy.signal import resample_poly

                x, fs = resample_poly(x, 5, 2, axis=0), 250.0
            write_record(base, x, fs, names, adc_gain=1000.0)
        elif fault == "duplicate_id":
            db = pd.concat([db, db.iloc[[k]]], ignore_index=True)
        elif fault == "malformed_scp_codes":
            db.loc[k, "scp_codes"] = "{'NORM': 100.0, 'SR':"
        else:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        expected[ecg_id] = EXPECTED_REASON[fault]
    db.to_csv(db_file, index=False)
    return expected
