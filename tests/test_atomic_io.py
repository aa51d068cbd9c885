"""Atomic writes: a failed write leaves the old file and no temp file; published files get the umask's mode."""
import os
import stat

import pytest

from fastticket.lottery.atomic_io import atomic_write, atomic_write_json, atomic_write_text, remove_stale_temps


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(str(path), {"acc": 0.9})

    def explode(f):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(str(path), explode)
    assert path.read_text().strip().startswith("{") and '"acc": 0.9' in path.read_text()
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_published_files_follow_the_umask_not_mkstemp(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~previous


def test_stale_temps_are_removed_and_real_files_kept(tmp_path):
    (tmp_path / ".mask.pt.123.abc.tmp").write_bytes(b"torn")
    (tmp_path / "mask.pt").write_bytes(b"real")
    remove_stale_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mask.pt"]
