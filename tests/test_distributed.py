"""A search over several processes (fastticket.lottery.platform), on CPU with gloo over 127.0.0.1: trials mode gives
the one-process numbers exactly, data mode within float32 reduction order, both resume after a rank is
SIGKILLed, and bad set-ups end in one line on every rank instead of a hang.

Ranks are started the way torchrun starts them (its environment variables; one test goes through torchrun
itself). Every process runs one intra-op thread, as the in-process references do, so bit-for-bit comparisons
compare the same arithmetic.
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastticket.app import cli
from fastticket.lottery.data import DataShard, load_dataset
from run_snapshot import ONE_THREAD_ENV, load, run_dir_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
# Two trials x (ticket, reinit, rigl), each with its --stability twin: twelve arms at level 1, six per rank in
# trials mode. RigL drops and regrows every 10 steps (its mask moves mid-level on every rank alike) and the
# twins' instability is evaluated after each level: both under torchrun, as one process.
SEARCH = ["--levels", "1", "--iterations", "40", "--eval-every", "10", "--trials", "2", "--controls",
          "reinit,rigl", "--dst-interval", "10", "--stability", "3", "--device", "cpu", "--no-progress"]
# Checkpoints every 4 iterations, so a kill lands mid-level with a checkpoint to resume from.
KILLED = ["--levels", "1", "--iterations", "80", "--eval-every", "4", "--controls", "reinit", "--device", "cpu",
          "--no-progress"]
HANG = 240  # seconds: a launch that takes longer hangs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, world=2, cwds=None, rank_args=None, tmp=None):
    """`world` processes of `fastticket search ARGS` with torchrun's environment; their output goes to files."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = dict(ONE_THREAD_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        log = open(os.path.join(tmp, f"rank{rank}-{port}.log"), "w+")
        cmd = [sys.executable, "-m", "fastticket", "search", *args, *((rank_args or {}).get(rank, []))]
        procs.append((subprocess.Popen(cmd, env=env, cwd=(cwds or {}).get(rank), stdout=log, stderr=log), log))
    return procs


def _finish(procs):
    """(exit status, output) of each rank; fails (after killing them) if they do not end in time."""
    deadline, out = time.time() + HANG, []
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail("the ranks did not finish: a hang")
        log.seek(0)
        out.append((proc.returncode, log.read()))
        log.close()
    return out


def _run(args, tmp, **kwargs):
    results = _finish(_start(args, tmp=str(tmp), **kwargs))
    for status, text in results:
        assert status == 0, text
        assert "Traceback" not in text
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process searches the multi-process ones must reproduce (this process, one thread)."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, args in (("search", SEARCH), ("killed", KILLED)):
        runs[name] = str(root / name)
        assert cli.main(["search", *args, "--out", runs[name]]) == 0
    return runs


def _same_run(expected, got):
    rows_a, tensors_a, lines_a = run_dir_snapshot(expected)
    rows_b, tensors_b, lines_b = run_dir_snapshot(got)
    assert rows_a and rows_a == rows_b
    assert lines_a == lines_b
    assert tensors_a.keys() == tensors_b.keys()
    for key, state in tensors_a.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, tensors_b[key][name]), f"{key}:{name} differs"


def test_trials_over_two_ranks_under_torchrun_match_one_process(reference, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastticket", "search", *SEARCH, "--out", out]
    done = subprocess.run(cmd, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(reference["search"], out)
    # Rank 0 alone printed the summary and wrote the report.
    assert done.stdout.count("run directory:") == 1
    assert os.path.exists(os.path.join(out, "report", "results.csv"))
    assert not glob.glob(os.path.join(out, "**", ".*.tmp"), recursive=True)


def _close(expected, got, what):
    """Data-parallel equality. The ranks compute the one-process gradient of the same global batch, but as the
    mean of two shard means summed in another order: float32 rounding (~1e-7 relative per step) that 40 Adam
    steps carry into the weights (measured: 2e-7 absolute). 1e-4 leaves a wide margin over that and still
    catches a rank training on a wrong shard or without averaged gradients (1e-2 differences)."""
    assert abs(expected - got) <= 1e-4 * max(1.0, abs(expected)), f"{what}: {expected} vs {got}"


def _close_run(expected, got):
    rows_a, tensors_a, lines_a = run_dir_snapshot(expected)
    rows_b, tensors_b, _ = run_dir_snapshot(got)
    assert rows_a.keys() == rows_b.keys() and rows_a
    for key, a in rows_a.items():
        b = rows_b[key]
        assert a["early_stop_iter"] == b["early_stop_iter"] and a["status"] == b["status"] == "ok", key
        assert a["density"] == b["density"]
        _close(a["early_stop_val_loss"], b["early_stop_val_loss"], f"{key} val loss")
        # An accuracy is a count of test images: a logit within rounding of a tie may flip one image.
        assert abs(a["test_acc_at_early_stop"] - b["test_acc_at_early_stop"]) <= 0.001, key
        if a.get("instability") is not None:  # test error in points along the twins' path: 0.1 per image
            assert abs(a["instability"] - b["instability"]) <= 0.2 + 1e-9, key
    for key, state in tensors_a.items():
        for name, tensor in state.items():
            if key.endswith("mask.pt") or name.endswith("weight_mask"):
                assert torch.equal(tensor, tensors_b[key][name]), f"{key}:{name}: the masks must be identical"
            else:
                assert (tensor - tensors_b[key][name]).abs().max() <= 1e-4, f"{key}:{name}"


def test_data_parallel_over_two_ranks_matches_one_process(reference, tmp_path):
    out = str(tmp_path / "run")
    results = _run([*SEARCH, "--distributed", "data", "--out", out], tmp_path)
    _close_run(reference["search"], out)
    assert sum(text.count("run directory:") for _, text in results) == 1


def test_data_shards_cover_each_global_batch_once():
    data = load_dataset("mnist5k", None, "cpu", 500, 0)
    for iteration in (0, 57, 58):  # 58 straddles an epoch boundary (3,500 images, batch 60)
        x, y = data.batch(iteration, 60, 3)
        parts = [DataShard(data, rank, 3).batch(iteration, 60, 3) for rank in range(3)]
        assert [p[0].shape[0] for p in parts] == [20, 20, 20]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    shards = [DataShard(data, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([s.val.y for s in shards]), data.val.y)
    assert torch.equal(torch.cat([s.test.x for s in shards]), data.test.x)


def _mid_level(procs, arm_glob, out):
    """Wait until an arm of level 1 has a checkpoint but no result (False if the ranks ended first)."""
    deadline = time.time() + HANG
    while time.time() < deadline and all(p.poll() is None for p, _ in procs):
        if any(os.path.exists(os.path.join(d, "checkpoint.pt")) and not os.path.exists(os.path.join(d, "result.json"))
               for d in glob.glob(os.path.join(out, "levels", "level_01", arm_glob))):
            return True
        time.sleep(0.002)
    return False


def _kill_mid_level(procs, arm_glob, out):
    """SIGKILL rank 1 once an arm of level 1 has a checkpoint but no result, then the other ranks (torchrun
    stops the rest of a job when a worker dies)."""
    try:
        if _mid_level(procs, arm_glob, out):
            procs[1][0].send_signal(signal.SIGKILL)
    finally:
        for proc, log in procs:
            proc.kill()
            proc.wait()
            log.close()
    unfinished = [d for d in glob.glob(os.path.join(out, "levels", "level_01", "*"))
                  if not os.path.exists(os.path.join(d, "result.json"))]
    assert unfinished, "the run finished level 1 before it could be killed"


def test_trials_resume_after_sigkill_of_a_rank_with_another_world_size(reference, tmp_path):
    out = str(tmp_path / "run")
    # Level 1 has two arms: the ticket on rank 0, the reinit control on rank 1, killed while it trains.
    _kill_mid_level(_start([*KILLED, "--out", out], tmp=str(tmp_path)), "reinit_trial0", out)
    done = subprocess.run([sys.executable, "-m", "fastticket", "search", *KILLED, "--out", out, "--resume"],
                          env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    _same_run(reference["killed"], out)


def test_data_parallel_resume_after_sigkill_of_a_rank(reference, tmp_path):
    out = str(tmp_path / "run")
    args = [*KILLED, "--distributed", "data", "--out", out]
    _kill_mid_level(_start(args, tmp=str(tmp_path)), "*", out)
    # Rank 0 reads the checkpoints and gives every rank their state.
    assert glob.glob(os.path.join(out, "levels", "level_01", "*", "checkpoint.pt"))
    _run([*args, "--resume"], tmp_path)
    _close_run(reference["killed"], out)


PEER_TIMEOUT = 8  # --dist-timeout of the peer-death tests: the survivor must be gone PEER_TIMEOUT + SLACK after
SLACK = 40  # seconds: the survivor finishing its arm, polling, leaving, on a loaded 2-core machine


@pytest.mark.parametrize("victim, arm, how, says", [
    (1, "reinit_trial0", signal.SIGKILL, "rank 1 died"),
    (0, "ticket_trial0", signal.SIGKILL, "lost the rendezvous store"),  # rank 0 hosted it
    (1, "reinit_trial0", signal.SIGSTOP, "rank 1 has not answered for"),  # a hang: alive, silent
])
def test_a_rank_that_dies_ends_the_other_in_bounded_time_and_one_line(reference, tmp_path, victim, arm, how, says):
    """Kill (or freeze) one rank mid-level, with no torchrun to stop the other: the survivor knows a dead peer
    at once and waits at most --dist-timeout for a silent one, says so in one line, exits 1, and the same
    command with --resume gives the uninterrupted run's results."""
    out = str(tmp_path / "run")
    args = [*KILLED, "--dist-timeout", str(PEER_TIMEOUT), "--out", out]
    procs = _start(args, tmp=str(tmp_path))
    try:
        assert _mid_level(procs, arm, out), "the run finished level 1 before it could be killed"
        procs[victim][0].send_signal(how)
        killed_at = time.time()
        [(code, text)] = _finish([procs[1 - victim]])
        elapsed = time.time() - killed_at
    finally:
        for proc, log in procs:
            proc.kill()
            proc.wait()
            log.close()
    assert code == 1, text
    assert elapsed < PEER_TIMEOUT + SLACK, f"the survivor took {elapsed:.0f} s: {text}"
    lines = [line for line in text.splitlines() if line.startswith("fastticket")]
    assert len(lines) == 1 and "Traceback" not in text and f"rank {1 - victim}" in lines[0], text
    assert says in lines[0] and "--resume" in lines[0], text
    if how == signal.SIGKILL and victim == 1:
        _run([*args, "--resume"], tmp_path)
        _same_run(reference["killed"], out)


@pytest.mark.parametrize("case, args, rank_args, status, says", [
    ("settings differ", SEARCH, {1: ["--lr", "0.002"]}, 2, "rank 1 was started with other settings than rank 0 (lr"),
    ("batch does not split", [*SEARCH, "--distributed", "data", "--batch-size", "61"], None, 2,
     "--batch-size 61 does not split evenly over 2 ranks"),
    ("nccl without GPUs", [*SEARCH, "--dist-backend", "nccl"], None, 2, "--dist-backend nccl needs CUDA GPUs"),
])
def test_bad_setups_end_in_one_line_on_every_rank(tmp_path, case, args, rank_args, status, says):
    if case == "nccl without GPUs" and torch.cuda.is_available():
        pytest.skip("checks the no-GPU error")
    results = _finish(_start([*args, "--out", str(tmp_path / "run")], rank_args=rank_args, tmp=str(tmp_path)))
    for rank, (code, text) in enumerate(results):
        assert code == status, text
        assert says in text and "Traceback" not in text, text
        assert len([line for line in text.splitlines() if line.startswith("fastticket")]) == 1, text


def test_a_rank_that_cannot_see_the_run_directory_is_one_line(tmp_path):
    # A relative --out in a different working directory per rank: rank 1 does not see what rank 0 prepared.
    cwds = {rank: str(tmp_path / f"node{rank}") for rank in range(2)}
    for path in cwds.values():
        os.makedirs(path)
    results = _finish(_start([*SEARCH, "--out", "run"], cwds=cwds, tmp=str(tmp_path)))
    for code, text in results:
        assert code == 1, text
        assert "rank 1" in text and "cannot see the run directory" in text and "Traceback" not in text, text
    assert not os.path.exists(os.path.join(cwds[1], "run"))


@pytest.mark.launches_triton
def test_masked_optimizer_under_ddp_keeps_pruned_weights_zero_on_every_rank(tmp_path):
    """DDP's gradient hooks and the masked layer (Triton kernels) and optimizer compose: two ranks on half a
    batch each end where one process on the whole batch ends, pruned weights exactly zero on both."""
    sys.path.insert(0, HERE)
    try:
        import ddp_masked_worker as worker
    finally:
        sys.path.remove(HERE)
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(ONE_THREAD_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), TRITON_INTERPRET="1")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_masked_worker.py"), "triton",
                                       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        output, _ = proc.communicate(timeout=HANG)
        assert proc.returncode == 0, output.decode()[-3000:]
    ranks = [load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]

    # The one-process reference: the whole batch, the PyTorch backend, float64.
    layer, mask, xs, targets = worker.problem()
    layer = layer.double()
    optimizer = worker.MaskedAdam(layer.parameters(), lr=0.05)
    with worker.use_backend("torch"):
        for step in range(worker.STEPS):
            loss = ((layer(xs[step].double()) - targets[step].double()) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for state in ranks:
        assert torch.equal(state["mask"], mask)
        assert torch.count_nonzero(state["weight"][~mask]) == 0
        assert (state["weight"].double() - layer.weight.detach()).abs().max() < 1e-4
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
