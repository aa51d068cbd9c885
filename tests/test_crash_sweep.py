"""Crash consistency proven at every point, not sampled (issue 21): a tiny search (and a report) is killed once
per fault point of fastticket.lottery.atomic_io (SIGKILL at the N-th fsync or rename, FASTTICKET_FAULT_AT=N),
resumed with the same call, and must end with the results, masks, weights and checksums of an uninterrupted
run, the same files (no temp file, no checkpoint left over), a free lock and a resumable directory.

Each run is a forked child of the test process (torch and the dataset are loaded once, here), so one point
costs a killed run plus its resume, not two interpreter starts.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback

import pytest
import torch

from fastticket.lottery.atomic_io import FAULT_AT_ENV, FAULT_LOG_ENV, FAULT_RANK_ENV
from fastticket.lottery.data import _mnist5k_arrays
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import RunDir
from fastticket.lottery.search import run_search
from run_snapshot import run_dir_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes):
    base = dict(iterations=4, eval_every=2, batch_size=20, val_size=100, levels=1, controls=["reinit"], device="cpu")
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def fork_worker(fn, log, env=None):
    """Start `fn()` in a forked child with `env` added, its output to `log`; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env or {})
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the log and the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid):
    """The child's exit code, or -signal if it was killed."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def forked(fn, env=None, log=None):
    """Run `fn()` in a forked child (`fork_worker`) and wait for it."""
    return wait(fork_worker(fn, log or os.devnull, env))


def count_points(fn, tmp_path):
    """How many fault points an uninterrupted `fn()` passes (each logged as 'N kind path')."""
    log = str(tmp_path / "points.log")
    assert forked(fn, {FAULT_LOG_ENV: log}) == 0
    with open(log) as f:
        return len(f.read().splitlines())


def files(out):
    """Every file under `out` (the lock aside), relative."""
    found = glob.glob(os.path.join(out, "**", "*"), recursive=True) + \
        glob.glob(os.path.join(out, "**", ".*"), recursive=True)
    return sorted(os.path.relpath(p, out) for p in found if os.path.isfile(p) and os.path.basename(p) != ".lock")


def checksums(out):
    """{arm/file: sha256} of the weights and masks as recorded in checksums.json, checked against the bytes."""
    import hashlib
    digests = {}
    for path in glob.glob(os.path.join(out, "levels", "*", "*", "checksums.json")):
        with open(path) as f:
            entries = json.load(f)
        for name, entry in entries.items():
            if name.endswith(".pt"):
                with open(os.path.join(os.path.dirname(path), name), "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], (path, name)
                digests[os.path.relpath(os.path.join(os.path.dirname(path), name), out)] = entry["sha256"]
    return digests


def same_run(out, ref):
    rows, tensors, lines = run_dir_snapshot(out)
    ref_rows, ref_tensors, ref_lines = run_dir_snapshot(ref)
    assert rows == ref_rows and lines == ref_lines
    assert tensors.keys() == ref_tensors.keys()
    for key, value in tensors.items():
        assert value.keys() == ref_tensors[key].keys(), key
        assert all(torch.equal(value[k], ref_tensors[key][k]) for k in value), key
    assert checksums(out) == checksums(ref)
    assert files(out) == files(ref)  # no temp file, no rolling checkpoint left over
    return True


def check_point(n, points, run, ref, work, same):
    """Kill `run` at fault point `n`, resume it with the same call, compare with the uninterrupted `ref`."""
    out, log = os.path.join(work, f"at{n}"), os.path.join(work, f"at{n}.log")
    assert forked(lambda: run(out, False), {FAULT_AT_ENV: str(n)}, log) == -signal.SIGKILL, open(log).read()
    assert forked(lambda: run(out, True), {}, log) == 0, f"point {n}: {open(log).read()}"
    try:
        assert same(out, ref)
    except AssertionError as exc:
        raise AssertionError(f"resume after a kill at fault point {n} of {points} differs: {exc}") from None
    lock = RunDir(out)
    lock.lock()  # the killed run left no stale lock
    lock.unlock()
    shutil.rmtree(out)
    os.remove(log)


def sweep(tmp_path, run, same=None):
    """`check_point` (comparing by `same`, default `same_run`) at every fault point of `run(out, resume)`, the points shared by two workers (two
    cores); the number of points. On tmpfs where there is one: fsync there costs nothing, and a process
    kill (not a power cut) is what is injected, so durability on the disk is not what is tested."""
    work = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else str(tmp_path)
    try:
        ref = os.path.join(work, "ref")
        points = count_points(lambda: run(ref, False), tmp_path)
        assert points > 0
        workers = max(1, min(2, os.cpu_count() or 1))

        def share(k):
            for n in range(1 + k, points + 1, workers):
                check_point(n, points, run, ref, work, same or same_run)
        logs = [str(tmp_path / f"worker{k}.log") for k in range(workers)]
        pids = [fork_worker(lambda k=k: share(k), logs[k]) for k in range(workers)]
        failed = [open(log).read() for pid, log in zip(pids, logs) if wait(pid) != 0]
        assert not failed, "\n".join(failed)
        return points
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """One search here first: the children then inherit the dataset and every module a search imports
    lazily, instead of each loading them again (seconds per child)."""
    _mnist5k_arrays()
    run_search(tiny(), str(tmp_path_factory.mktemp("warm") / "run"), progress=False)


def test_batched_search_survives_a_kill_at_every_fault_point(tmp_path):
    config = tiny()  # level 1: ticket and reinit trained together as one stacked model
    points = sweep(tmp_path, lambda out, resume: run_search(config, out, resume=resume, progress=False))
    print(f"batched search: {points} fault points, every resume identical")


def test_multi_trial_search_survives_a_kill_at_every_fault_point(tmp_path):
    # Two trials, arms trained one at a time; one checkpoint per arm (the batched sweep covers a checkpoint
    # overwriting the previous one), which keeps the sweep's share of the suite's time small.
    config = tiny(trials=2, controls=[], parallel_arms=1, eval_every=4)
    points = sweep(tmp_path, lambda out, resume: run_search(config, out, resume=resume, progress=False))
    print(f"multi-trial search: {points} fault points, every resume identical")


def test_report_survives_a_kill_at_every_fault_point(tmp_path):
    from fastticket.app import cli
    run_dir = str(tmp_path / "run")
    run_search(tiny(), run_dir, progress=False)
    assert cli.main(["report", run_dir]) == 0  # here once: the children inherit matplotlib, loaded
    shutil.rmtree(os.path.join(run_dir, "report"))

    def report(out, resume):
        if not os.path.exists(out):
            shutil.copytree(run_dir, out)
        assert cli.main(["report", out]) == 0

    def report_files(out):
        folder = os.path.join(out, "report")
        return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}

    points = sweep(tmp_path, report, same=lambda out, ref: report_files(out) == report_files(ref))
    print(f"report: {points} fault points, every rerun identical")


# A 2-rank trials search: level 0's ticket on rank 0; at level 1 the ticket on rank 0, the reinit on rank 1.
# The survivor of a kill knows at once (the dead pid, or the store rank 0 hosted); KILLED_TIMEOUT bounds its
# wait if not (--dist-timeout; resume may change it).
KILLED_TIMEOUT, RANKS_DEADLINE = 10.0, 120


def run_ranks(config, out, resume, env, logs):
    """Both ranks of `config` as forked children with torchrun's environment (and `env`), each writing to its
    log (emptied first), to their end (a hang fails the test, the ranks killed); their exit codes."""
    for log in logs:
        open(log, "w").close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pids = [fork_worker(lambda: run_search(config, out, resume=resume, progress=False), logs[rank],
                        dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                             LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")) for rank in range(2)]
    codes, deadline = {}, time.time() + RANKS_DEADLINE
    while len(codes) < 2:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.time() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise AssertionError(f"the ranks did not end within {RANKS_DEADLINE} s: a hang")
        time.sleep(0.02)
    return [codes[pid] for pid in pids]


def check_rank_point(rank, n, points, configs, ref, work):
    """Kill `rank` of a 2-rank search at its fault point `n` (the other rank must end by itself), resume over 2
    ranks with the same settings, compare with the uninterrupted `ref`."""
    config, killed = configs
    out, logs = os.path.join(work, f"r{rank}at{n}"), [os.path.join(work, f"r{rank}at{n}.rank{r}.log") for r in range(2)]
    codes = run_ranks(killed, out, False, {FAULT_AT_ENV: str(n), FAULT_RANK_ENV: str(rank)}, logs)
    assert codes[rank] == -signal.SIGKILL, (rank, n, codes, open(logs[rank]).read())
    assert run_ranks(config, out, True, {}, logs) == [0, 0], (rank, n, open(logs[0]).read(), open(logs[1]).read())
    try:
        assert same_run(out, ref)
    except AssertionError as exc:
        raise AssertionError(f"resume after a kill of rank {rank} at its fault point {n} of {points} differs: "
                             f"{exc}") from None
    lock = RunDir(out)
    lock.lock()  # no stale lock
    lock.unlock()
    shutil.rmtree(out)


def test_two_rank_search_survives_a_kill_at_every_fault_point_of_each_rank(tmp_path):
    """Every fault point of each rank of a 2-rank trials search (FASTTICKET_FAULT_RANK): that rank is killed
    there, the other ends by itself (peer loss within --dist-timeout), and the same command with --resume
    over 2 ranks gives the uninterrupted run's results, masks, checksums and files. The points are shared
    by two workers (two cores), as in `sweep`."""
    config = tiny(trials=1, eval_every=4, dist_timeout=60.0)  # one evaluation per arm: fewer points, each kind
    configs = (config, config.replace(dist_timeout=KILLED_TIMEOUT))
    work = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else str(tmp_path)
    logs = [os.path.join(work, f"rank{r}.log") for r in range(2)]
    try:
        ref, counted = os.path.join(work, "ref"), {}
        for rank in range(2):
            points = os.path.join(work, f"points{rank}.log")
            out = ref if rank == 0 else os.path.join(work, "count")
            assert run_ranks(config, out, False, {FAULT_LOG_ENV: points, FAULT_RANK_ENV: str(rank)}, logs) == [0, 0]
            with open(points) as f:
                counted[rank] = len(f.read().splitlines())
        assert counted[0] > 0 and counted[1] > 0, counted
        todo = [(rank, n) for rank, points in counted.items() for n in range(1, points + 1)]
        workers = max(1, min(2, os.cpu_count() or 1))

        def share(k):
            for rank, n in todo[k::workers]:
                check_rank_point(rank, n, counted[rank], configs, ref, work)
        worker_logs = [str(tmp_path / f"worker{k}.log") for k in range(workers)]
        pids = [fork_worker(lambda k=k: share(k), worker_logs[k]) for k in range(workers)]
        failed = [open(log).read()[-6000:] for pid, log in zip(pids, worker_logs) if wait(pid) != 0]
        assert not failed, "\n".join(failed)
        print(f"2-rank search: {counted[0]} fault points of rank 0, {counted[1]} of rank 1, every resume identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)
