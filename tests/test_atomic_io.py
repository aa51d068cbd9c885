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


def test_a_live_writers_temp_is_kept(tmp_path):
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live, dead = tmp_path / f".a.pt.{proc.pid}.x1.tmp", tmp_path / ".b.pt.999999999.x2.tmp"
        live.write_bytes(b"being written")
        dead.write_bytes(b"torn")
        remove_stale_temps(str(tmp_path))
        assert live.exists() and not dead.exists()
    finally:
        proc.kill()
        proc.wait()


def test_fault_points_are_counted_and_the_chosen_one_kills(tmp_path):
    import subprocess
    import sys
    log = tmp_path / "points.log"
    code = ("import sys; from fastticket.lottery.atomic_io import atomic_write_text as w; "
            "[w(sys.argv[1] + f'/f{i}.txt', 'x') for i in range(3)]")
    env = dict(os.environ, FASTTICKET_FAULT_LOG=str(log))
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env).returncode == 0
    assert [line.split()[:2] for line in log.read_text().splitlines()] == \
        [[str(n), kind] for n, kind in enumerate(["fsync", "rename"] * 3, 1)]
    killed = tmp_path / "killed"
    killed.mkdir()
    env = dict(os.environ, FASTTICKET_FAULT_AT="3")  # the second file's fsync: its temp file is left
    assert subprocess.run([sys.executable, "-c", code, str(killed)], env=env).returncode == -9
    names = sorted(os.listdir(killed))
    assert names[1:] == ["f0.txt"] and names[0].startswith(".f1.txt.") and names[0].endswith(".tmp")
