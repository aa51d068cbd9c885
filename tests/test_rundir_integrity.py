"""Run-directory integrity (issue 10): verified files, damaged files recomputed or named, the run lock,
unwritable outputs and full disks, and bad input refused before the first write."""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastticket.app import cli
from fastticket.errors import ConfigError, DamagedFileError, OutputError, RunDirError, RunLockedError
from fastticket.lottery.presets import get_preset
from fastticket.lottery.armdir import ArmDir
from fastticket.lottery.rundir import RunDir, arm_dir
from fastticket.lottery.search import run_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_FLAGS = ["--levels", "1", "--iterations", "20", "--eval-every", "10", "--controls", "reinit", "--no-progress"]


def tiny(**changes):
    base = dict(iterations=20, eval_every=10, levels=1, controls=["reinit"], device="cpu")
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def main(argv):
    """cli.main's exit status, whether it returns or exits through argparse."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _same(rows):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def _keep_checkpoints(monkeypatch):
    monkeypatch.setattr(ArmDir, "drop_checkpoint", lambda self: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run: what every recovered run must reproduce."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    return out, run_search(tiny(), out, progress=False)


def _unfinish(out, level, arm):
    """Make an arm look interrupted after its last checkpoint (result.json and final.pt gone)."""
    d = arm_dir(out, level, arm, 0)
    for name in ("result.json", "final.pt"):
        os.remove(os.path.join(d, name))
    return d


def _run_with_checkpoints(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    with monkeypatch.context() as mp:
        _keep_checkpoints(mp)
        run_search(tiny(), out, progress=False)
    return out


def _entries(d):
    with open(os.path.join(d, "checksums.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("damage", ["foreign-file", "foreign-identity", "foreign-mask", "flipped-bytes", "truncated",
                                    "empty", "garbled"])
def test_a_checkpoint_that_fails_verification_is_discarded_and_the_arm_restarts(
        damage, reference, tmp_path, monkeypatch, capsys):
    ref_out, ref_rows = reference
    out = _run_with_checkpoints(tmp_path, monkeypatch)
    d = _unfinish(out, 1, "reinit")
    ckpt = os.path.join(d, "checkpoint.pt")
    other = arm_dir(out, 1, "ticket", 0)  # a valid checkpoint of another arm (same shapes, other mask)
    if damage == "foreign-file":
        shutil.copy(os.path.join(other, "checkpoint.pt"), ckpt)
    elif damage == "foreign-identity":  # the file and its checksum entry both copied in
        shutil.copy(os.path.join(other, "checkpoint.pt"), ckpt)
        entries = _entries(d)
        entries["checkpoint.pt"] = _entries(other)["checkpoint.pt"]
        with open(os.path.join(d, "checksums.json"), "w") as f:
            json.dump(entries, f)
    elif damage == "foreign-mask":  # correctly filed under this arm, but its mask is not mask.pt's
        state = torch.load(os.path.join(other, "checkpoint.pt"), weights_only=True)
        state["model"]["fc.0.weight_mask"] = ~state["model"]["fc.0.weight_mask"]
        RunDir(out).arm(1, "reinit", 0).save_checkpoint(state)
    else:
        data = bytearray(open(ckpt, "rb").read())
        if damage == "flipped-bytes":
            for i in range(20):
                data[len(data) // 3 + 97 * i] ^= 0xFF
        elif damage == "truncated":
            data = data[: len(data) // 2]
        elif damage == "empty":
            data = bytearray()
        else:
            data = bytearray(b"\x80\x04garbage" * 50)
        open(ckpt, "wb").write(bytes(data))
    capsys.readouterr()
    rows = run_search(tiny(), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert _same(rows) == _same(ref_rows)  # never a number from the bad file; same numbers as uninterrupted
    assert "checkpoint.pt" in err and "restarts from its beginning" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "checkpoint.pt" in line]) == 1


def test_a_damaged_finished_result_is_trained_again(reference, tmp_path, capsys):
    ref_out, ref_rows = reference
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out)
    path = os.path.join(arm_dir(out, 1, "ticket", 0), "result.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])  # truncated
    final = os.path.join(arm_dir(out, 1, "reinit", 0), "final.pt")
    data = bytearray(open(final, "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a finished arm's weights
    open(final, "wb").write(bytes(data))
    capsys.readouterr()
    rows = run_search(tiny(), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert _same(rows) == _same(ref_rows)
    assert "result.json" in err and "final.pt" in err and "trained again" in err


def test_a_damaged_rewind_point_is_one_line_naming_it(reference, tmp_path, capsys):
    ref_out, _ = reference
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out)
    shutil.rmtree(arm_dir(out, 1, "ticket", 0))  # level 1 must be redone from the rewind point
    rewind = os.path.join(arm_dir(out, 0, "ticket", 0), "rewind.pt")
    open(rewind, "wb").write(open(rewind, "rb").read()[:100])
    code = main(["search", "--out", out, "--resume", *TINY_FLAGS, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "rewind.pt failed verification" in err


def test_finished_arms_drop_their_checkpoint_and_resume_recognises_them(reference):
    out, rows = reference
    assert not glob.glob(os.path.join(out, "levels", "*", "*", "checkpoint.pt"))
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "levels", "*", "*", "*"))}
    assert _same(run_search(tiny(), out, resume=True, progress=False)) == _same(rows)
    assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "levels", "*", "*", "*"))}


def test_resume_with_more_levels_extends_a_finished_run(reference, tmp_path):
    ref_out, ref_rows = reference
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out)
    rows = run_search(tiny(levels=2), out, resume=True, progress=False)
    assert _same(rows[: len(ref_rows)]) == _same(ref_rows)
    assert [(r["level"], r["arm"]) for r in rows[len(ref_rows):]] == [(2, "ticket"), (2, "reinit")]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["levels"] == 2
    with pytest.raises(RunDirError, match="levels.*can only grow"):
        run_search(tiny(levels=1), out, resume=True, progress=False)


# ------------------------------------------------------------------------------------------------- the lock

def test_a_second_process_is_refused_with_the_holder_named(tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = RunDir(out)
    holder.lock()
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} on "):
            run_search(tiny(), out, progress=False)
        code = main(["search", "--out", out, *TINY_FLAGS])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and f"pid {os.getpid()}" in err
    finally:
        holder.unlock()
    assert os.listdir(out) == [".lock"]  # the refused searches wrote nothing


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / "run")
    code = ("import sys, time; from fastticket.lottery.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            RunDir(out).lock()
    finally:
        proc.kill()
        proc.wait()
    run = RunDir(out)
    run.lock()  # SIGKILL released it: the kernel drops an flock with its holder
    run.unlock()


# ------------------------------------------------------------------------------- unwritable output, full disk

def test_out_at_a_file_or_a_read_only_place_is_one_line(tmp_path, capsys, monkeypatch):
    target = tmp_path / "a-file"
    target.write_text("mine")
    code = main(["search", "--out", str(target), *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "is a file" in err
    assert target.read_text() == "mine"

    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = main(["search", "--out", str(tmp_path / "ro" / "run"), *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "read-only filesystem" in err
    code = main(["bench", "--quick", "--suite", "linear", "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "is a file" in err


def test_a_full_disk_is_one_line_leaves_no_temp_and_resume_continues(reference, tmp_path, capsys, monkeypatch):
    _, ref_rows = reference
    out = str(tmp_path / "run")
    real_fdopen = os.fdopen
    budget = {"writes": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(data) > 100_000:  # the first big file (a checkpoint) hits the full disk half-way
                self.f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            budget["writes"] += 1
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with monkeypatch.context() as mp:
        mp.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, mode, *a, **k)))
        code = main(["search", "--out", out, *TINY_FLAGS, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "disk full writing" in err and "needed" in err and "free" in err and "--resume" in err
    assert not [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if p.endswith(".tmp")]
    assert not glob.glob(os.path.join(out, "**", ".*.tmp"), recursive=True)
    # On a bigger disk the same command with --resume finishes with the numbers of an uninterrupted run.
    rows = run_search(tiny(), out, resume=True, progress=False)
    assert _same(rows) == _same(ref_rows)


# ------------------------------------------------------------------------------- bad input before any write

@pytest.mark.parametrize("flags, fragments", [
    (["--batch-size", "5000"], ["--batch-size 5000", "training split", "3500"]),
    (["--model", "torchvision:resnet18"], ["torchvision:resnet18", "cannot run on mnist5k", "1x28x28"]),
    (["--seed", str(2**63 + 5)], ["seed must be an integer in [0,"]),
    (["--seed", "-1"], ["seed must be an integer in [0,"]),
    (["--rate", "1e-9"], ["--rate 1e-09 prunes nothing", "use --rate >="]),
    (["--levels", "1000000000"], ["levels must be an integer in [0, 1000]"]),
    (["--levels", "200"], ["--levels 200", "use --levels <="]),
    (["--granularity", "block:1000x1000"], ["block:1000x1000", "larger than every prunable layer"]),
    (["--lr", "inf"], ["--lr", "finite positive"]),
    (["--lr", "nan"], ["--lr", "finite positive"]),
    (["--device", "tpu"], ["device must be"]),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, fragments, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["search", "--out", str(out), *TINY_FLAGS, *flags])
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()  # nothing half-written: the corrected command starts cleanly


def test_tiny_rate_blames_rate_not_a_flag_the_user_never_set(tmp_path, capsys):
    code = main(["search", "--out", str(tmp_path / "r"), *TINY_FLAGS, "--rate", "1e-13"])
    err = capsys.readouterr().err
    assert code == 2 and "--rate" in err and "output_rate" not in err and "conv_rate" not in err


def test_batch_that_does_not_fit_memory_is_refused_with_what_fits(tmp_path, capsys, monkeypatch):
    import fastticket.lottery.preflight
    monkeypatch.setattr(fastticket.lottery.preflight, "available_memory", lambda device: 64 * 2**20)
    code = main(["search", "--out", str(tmp_path / "run"), *TINY_FLAGS, "--batch-size", "3000",
                     "--model", "conv2", "--dataset", "mnist5k"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 3000 needs about" in err and "only 64.0 MiB is free" in err and "--batch-size <=" in err
    assert not (tmp_path / "run").exists()


def test_triton_backend_that_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    import fastticket.sparse.backend
    monkeypatch.setenv("FASTTICKET_BACKEND", "triton")
    monkeypatch.setattr(fastticket.sparse.backend, "triton_interpreter_active", lambda: False)
    code = main(["search", "--out", str(tmp_path / "run"), *TINY_FLAGS, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "FASTTICKET_BACKEND=torch" in err
    assert not (tmp_path / "run").exists()


def test_every_arm_diverged_exits_non_zero(tmp_path, capsys):
    code = main(["search", "--out", str(tmp_path / "run"), *TINY_FLAGS, "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 1 and "every arm diverged" in err and "Traceback" not in err


def test_a_config_left_by_a_failed_start_is_reused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(tiny(lr=0.5).to_json())  # a start that died before any arm wrote a file
    (out / "levels" / "level_00").mkdir(parents=True)
    code = main(["search", "--out", str(out), *TINY_FLAGS, "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr"] == tiny().lr


def test_a_start_that_failed_before_training_is_reused_without_its_stale_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    import fastticket.lottery.train

    def out_of_memory(*args, **kwargs):
        raise MemoryError()
    with monkeypatch.context() as mp:  # dies at the first training step, after mask.pt / rewind.pt
        mp.setattr(fastticket.lottery.train, "evaluate", out_of_memory)
        mp.setattr(fastticket.lottery.train.F, "cross_entropy", out_of_memory)
        assert main(["search", "--out", str(out), *TINY_FLAGS, "--seed", "5"]) == 1
    assert "out of memory" in capsys.readouterr().err
    assert (out / "levels" / "level_00" / "ticket_trial0" / "rewind.pt").exists()
    # The corrected command (another seed) is not refused, and does not reuse the old seed's rewind point.
    assert main(["search", "--out", str(out), *TINY_FLAGS, "--seed", "0"]) == 0
    capsys.readouterr()
    reference = str(tmp_path / "ref")
    rows = run_search(tiny(seed=0), reference, progress=False)
    again = [json.loads(open(os.path.join(r["path"], "result.json")).read())
             for r in RunDir(str(out)).results()]
    key = lambda r: (r["level"], r["arm"])  # noqa: E731
    assert _same(sorted(again, key=key)) == _same(sorted(rows, key=key))


def test_device_auto_is_recorded_as_the_device_used(tmp_path):
    out = str(tmp_path / "run")
    run_search(tiny(device="auto", levels=0), out, progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    flags = [f for f in TINY_FLAGS if f != "--no-progress"]
    assert main(["search", "--out", str(tmp_path / "run"), *flags, "--levels", "0"]) == 0
    assert "\r" not in capsys.readouterr().err  # a log file gets no carriage returns


def test_a_verified_checkpoint_of_this_arm_is_still_used(tmp_path, monkeypatch, capsys):
    """The checks do not throw away good checkpoints: an interrupted arm continues (no restart message)."""
    out = _run_with_checkpoints(tmp_path, monkeypatch)
    _unfinish(out, 1, "reinit")
    capsys.readouterr()
    run_search(tiny(), out, resume=True, progress=False)
    assert "restarts" not in capsys.readouterr().err


def test_damaged_file_errors_are_run_dir_errors():
    assert issubclass(DamagedFileError, RunDirError) and issubclass(OutputError, OSError)
    assert issubclass(RunLockedError, RunDirError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("resume", [False, True])
def test_a_kill_while_the_first_config_was_written_does_not_brick_the_directory(resume, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.4242.k3j2.tmp").write_text('{"lr": 0.')  # the temp file of a killed first write
    flags = ["--resume"] if resume else []
    code = main(["search", "--out", str(out), *TINY_FLAGS, "--levels", "0", "--device", "cpu", *flags])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").exists() and not list(out.glob(".*.tmp"))


def test_a_file_of_the_wrong_size_is_refused_before_its_body_is_read(reference, tmp_path, monkeypatch):
    ref_out, _ = reference
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out)
    final = os.path.join(arm_dir(out, 1, "reinit", 0), "final.pt")
    written = os.path.getsize(final)
    with open(final, "ab") as f:
        f.write(bytes(2**20))  # junk appended: far more bytes than checksums.json records
    import builtins
    real_open = builtins.open

    def no_body_reads(path, mode="r", *args, **kwargs):
        assert not (str(path) == final and "r" in mode), "the body was read"
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_body_reads)
    with pytest.raises(DamagedFileError, match=f"holds {written + 2**20} bytes, {written} were written.*not read"):
        RunDir(out).arm(1, "reinit", 0).verified_bytes("final.pt")
