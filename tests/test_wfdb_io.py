import filecmp
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgproto.data.demo.wfdb_writer import write_record
from ecgproto.data.leads import LEADS
from ecgproto.data.wfdb_io import RecordError, read_record
from tests.conftest import real_ptbxl_subset


def _bases(root: Path, pattern: str, limit: int) -> list[Path]:
    return [p.with_suffix("") for p in sorted(root.glob(pattern))[:limit]]


def test_fast_reader_returns_what_wfdb_rdsamp_returns_on_demo_records(demo_root: Path) -> None:
    bases = (
        _bases(demo_root / "ptbxl", "records100/*/*.hea", 30)
        + _bases(demo_root / "ptbxl", "records500/*/*.hea", 5)
        + _bases(demo_root / "mimic-iv-ecg", "files/*/*/*/*.hea", 5)
    )
    assert len(bases) == 40
    for base in bases:
        ours = read_record(base)
        theirs, fields = wfdb.rdsamp(str(base))
        assert ours.fs == fields["fs"]
        assert list(ours.sig_names) == fields["sig_name"]
        np.testing.assert_allclose(ours.signal, theirs, atol=1e-6)


@pytest.mark.real_data
def test_fast_reader_returns_what_wfdb_rdsamp_returns_on_real_ptbxl() -> None:
    root = real_ptbxl_subset()
    if root is None:
        pytest.skip("real PTB-XL subset not unpacked (set ECGPROTO_PTBXL_SUBSET)")
    bases = _bases(root, "records100/*/*.hea", 200) + _bases(root, "records500/*/*.hea", 20)
    for base in bases:
        theirs, _ = wfdb.rdsamp(str(base))
        np.testing.assert_allclose(read_record(base).signal, theirs, atol=1e-6)


def test_demo_writer_files_are_byte_identical_to_wfdb_wrsamp(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    names = [lead.upper() for lead in LEADS]
    for i in range(4):  # the first call validates, later ones take the fast path
        x = rng.normal(0, 1.5, (1000, 12))
        x[3, 2] = np.nan
        write_record(tmp_path / "ours" / f"r{i}", x, 100, names, adc_gain=1000.0)
        (tmp_path / "wfdb").mkdir(exist_ok=True)
        wfdb.wrsamp(
            f"r{i}",
            fs=100,
            units=["mV"] * 12,
            sig_name=names,
            p_signal=x,
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(tmp_path / "wfdb"),
        )
        for ext in ("hea", "dat"):
            assert filecmp.cmp(tmp_path / "ours" / f"r{i}.{ext}", tmp_path / "wfdb" / f"r{i}.{ext}", shallow=False)


def test_missing_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(1000, 12))
    write_record(tmp_path / "a", x, 100, [lead.upper() for lead in LEADS], adc_gain=1000.0)
    dat = tmp_path / "a.dat"
    dat.write_bytes(dat.read_bytes()[:5000])
    with pytest.raises(RecordError) as err:
        read_record(tmp_path / "a")
    assert (
        err.value.reason == "truncated_dat" and "a.dat" in str(err.value) and "fetch the record again" in str(err.value)
    )
    dat.unlink()
    with pytest.raises(RecordError) as err:
        read_record(tmp_path / "a")
    assert err.value.reason == "missing_dat" and "a.dat" in str(err.value)


def test_a_signal_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A record whose .dat is a named pipe (or a folder) must end in quarantine at once: a read would block forever."""
    import os

    x = np.random.default_rng(0).normal(size=(1000, 12))
    write_record(tmp_path / "a", x, 100, [lead.upper() for lead in LEADS], adc_gain=1000.0)
    (tmp_path / "a.dat").unlink()
    os.mkfifo(tmp_path / "a.dat")
    with pytest.raises(RecordError) as err:
        read_record(tmp_path / "a")
    assert err.value.reason == "unreadable" and "not a regular file" in str(err.value) and "a.dat" in str(err.value)
    (tmp_path / "a.dat").unlink()
    (tmp_path / "a.dat").mkdir()
    with pytest.raises(RecordError, match="not a regular file"):
        read_record(tmp_path / "a")


def test_the_fast_symlink_check_agrees_with_realpath_on_links_dotdot_and_missing_files(tmp_path: Path) -> None:
    """The dataset-folder confinement resolves each file at one lstat: it must follow every link realpath does."""
    import os

    from ecgproto.data.wfdb_io import is_inside, real_path

    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "records" / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "secret.dat").write_bytes(b"x")
    (root / "records" / "a.dat").write_bytes(b"x")
    (root / "records" / "link.dat").symlink_to(elsewhere / "secret.dat")
    (root / "records" / "linked_folder").symlink_to(elsewhere)
    (root / "records" / "inner_link.dat").symlink_to(root / "records" / "a.dat")
    cases = {
        root / "records" / "a.dat": True,
        root / "records" / "link.dat": False,  # the file is a link out
        root / "records" / "linked_folder" / "secret.dat": False,  # a folder on the way is a link out
        root / "records" / "inner_link.dat": True,  # a link that stays inside
        root / "records" / "sub" / ".." / ".." / ".." / "elsewhere" / "secret.dat": False,
        root / "records" / "missing.dat": True,  # not there: the read says so, not this check
        elsewhere / "secret.dat": False,
    }
    for path, inside in cases.items():
        assert real_path(path) == os.path.realpath(path), path
        assert is_inside(path, root) is inside, path
