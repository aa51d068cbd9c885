"""SIGTERM, what schedulers send before they kill a job (fastticket.lottery.stop): a search stops at its next
safe point (right after a checkpoint), says in one line how to continue, exits with 143, and the same command
with --resume ends with the results of an uninterrupted run."""
import glob
import os
import signal
import subprocess
import sys

import pytest

from fastticket.app import cli
from run_snapshot import ONE_THREAD_ENV
from test_distributed import HANG, KILLED, _finish, _mid_level, _same_run, _start

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    assert cli.main(["search", *KILLED, "--out", out]) == 0
    return out


def _stopped_line(text):
    lines = [line for line in text.splitlines() if line.startswith("fastticket")]
    assert len(lines) == 1 and "Traceback" not in text, text
    assert "SIGTERM" in lines[0] and "--resume" in lines[0], text
    return lines[0]


def test_sigterm_stops_at_a_checkpoint_and_resume_gives_the_same_results(uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "fastticket", "search", *KILLED, "--out", out]
    proc = subprocess.Popen(cmd, env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _mid_level([(proc, None)], "*", out), "the run finished level 1 before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == cli.EXIT_STOPPED == 143, err
    assert "after the checkpoint at iteration" in _stopped_line(err)
    # Stopped after a checkpoint, not killed: no temp file, the lock released, an arm left to finish.
    assert not glob.glob(os.path.join(out, "**", ".*.tmp"), recursive=True)
    assert glob.glob(os.path.join(out, "levels", "level_01", "*", "checkpoint.pt"))
    done = subprocess.run([*cmd, "--resume"], env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    _same_run(uninterrupted, out)


def test_sigterm_stops_every_rank_of_a_torchrun_search(uninterrupted, tmp_path):
    """torchrun passes SIGTERM on to every worker: each stops at its next safe point (its checkpoint, or the
    wait for the other rank's arms), one line each; --resume ends as an uninterrupted run."""
    out = str(tmp_path / "run")
    args = [*KILLED, "--out", out]
    procs = _start(args, tmp=str(tmp_path))
    try:
        assert _mid_level(procs, "reinit_trial0", out), "the run finished level 1 before it could be stopped"
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        results = _finish(procs)
    finally:
        for proc, log in procs:
            proc.kill()
            proc.wait()
            log.close()
    for code, text in results:
        assert code == 143, text
        _stopped_line(text)
    done = subprocess.run([sys.executable, "-m", "fastticket", "search", *args, "--resume"], env=ONE_THREAD_ENV,
                          capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    _same_run(uninterrupted, out)
