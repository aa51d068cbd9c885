"""Ranks and devices: the one module that knows them. Which device a search trains on, and, across processes
launched by torchrun (or SLURM with the same environment), who this process is and the few collectives the
search needs, all through torch.distributed (nothing home-made on the wire). The rest of the library receives
a `Context` (the search passes it down); nothing asks for a global one.

Two modes (`SearchConfig.distributed`):

- "trials": a level's arms are split over the ranks in contiguous blocks of its run order (a trial's ticket
  and its controls mostly on one rank); each rank trains its arms (batched as usual) and writes only their
  directories; no gradient traffic. Barriers separate the steps that read another rank's files (controls read
  the ticket's mask; the next level reads this level's tickets).
- "data": every rank trains every arm on its shard of each global batch; DistributedDataParallel averages
  the gradients. Rank 0 prepares each arm (computes the mask once, loads checkpoints) and broadcasts it; the
  other ranks hold the same state and write nothing. Evaluation is sharded and summed over the ranks.

Every check that can fail on one rank only (the run directory, the data, the settings) goes through `agree`:
all ranks exchange their errors and all of them raise the first one, so a bad set-up ends in one line on
every rank instead of a rank waiting forever in a collective.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fastticket.errors import ConfigError, FastTicketError, StoppedError
from fastticket.lottery import stop
from fastticket.lottery.peers import DEFAULT_TIMEOUT_S, PeerWatch

T = TypeVar("T")


def launched() -> bool:
    """Did torchrun (or a scheduler setting the same variables) start this process as one of several?"""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched as several)."""
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the search: rank, world size, local rank (its GPU) and mode."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "trials"
    # The waits for other ranks' work, bounded by their heartbeats (fastticket.lottery.peers).
    peers: Optional[PeerWatch] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: writes the run's shared files, and in data mode every file."""
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.active and self.mode == "data"

    @property
    def trials_parallel(self) -> bool:
        return self.active and self.mode == "trials"

    # --------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.peers is not None:
            self.peers.barrier()
        elif self.active:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.active:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> List[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks in place (gloo and NCCL reduce on the tensor's own device)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's (in place)."""
        if self.active:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def shard_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Data mode: sum this rank's share of a total over the ranks (in place); else the total itself."""
        return self.sum_(tensor) if self.data_parallel else tensor

    def shard_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Data mode: the mean over the ranks of this rank's per-shard means (a new tensor); else `tensor`."""
        return self.sum_(tensor.clone()) / self.world if self.data_parallel else tensor

    def share_buffers_(self, module: nn.Module) -> None:
        """Data mode: overwrite `module`'s buffers (BatchNorm statistics) with rank 0's."""
        if self.data_parallel:
            self.broadcast_tensors_(list(module.buffers()))

    def wrap(self, module: nn.Module, statistics: bool) -> nn.Module:
        """`module` as this process trains it: wrapped in DistributedDataParallel in data mode (its gradients
        averaged over the ranks during backward), else itself. DDP broadcasts rank 0's parameters and buffers
        when it is built, so every rank starts an engine from one state; it broadcasts buffers before each
        forward only where the model has `statistics` (BatchNorm: every rank then evaluates with rank 0's
        running statistics, DDP's default), since masks never change while an arm trains."""
        if not self.data_parallel:
            return module
        from torch.nn.parallel import DistributedDataParallel
        device = next(module.parameters()).device
        with warnings.catch_warnings():  # torch >= 2.12 renames the argument; the old name still means the same
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                           broadcast_buffers=statistics)

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' `value` (decisions every rank must take alike, e.g. a group size)."""
        return min(self.gather(int(value)))

    def agree(self, check: Callable[[], T]) -> T:
        """Run `check` on every rank; if it raised a FastTicketError (or ValueError: bad input) on any rank,
        raise that error (the lowest rank's, naming the rank) on every rank, so no rank is left waiting for
        the others."""
        error: Optional[Exception] = None
        result: Any = None
        try:
            result = check()
        except (FastTicketError, ValueError) as exc:  # bad input (the CLI's one-line errors), not a bug
            error = exc
        if not self.active:
            if error is not None:
                raise error
            return result
        errors = self.gather(None if error is None else (type(error), str(error), socket.gethostname()))
        for rank, failure in enumerate(errors):
            if failure is not None:
                kind, text, host = failure
                raise _agreed(kind(f"rank {rank} ({host}): {text}")) from (error if rank == self.rank else None)
        return result

    # ------------------------------------------------------------------------------ work split
    def owner(self, index: int, count: int) -> int:
        """The rank that owns item `index` of `count` (contiguous blocks, sizes differing by at most one)."""
        return index * self.world // max(1, count) if self.active else 0

    def mine(self, count: int) -> List[int]:
        return [i for i in range(count) if self.owner(i, count) == self.rank]


SOLO = Context()  # one process: what everything receives outside a multi-process search
_AGREED = "raised_by_every_rank"


def _agreed(error: Exception) -> Exception:
    """Mark an error that every rank raises at the same point (see `session`)."""
    setattr(error, _AGREED, True)
    return error


def backend_for(requested: str, device: torch.device) -> str:
    """The torch.distributed backend: NCCL for GPUs, gloo for CPUs, or the one asked for (checked)."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ConfigError("--dist-backend nccl needs CUDA GPUs and --device cuda; this rank has "
                          f"{'no GPU' if not torch.cuda.is_available() else 'device ' + str(device)}: use "
                          f"--dist-backend gloo (or auto) on CPUs")
    return requested


def local_device(device: torch.device) -> torch.device:
    """A GPU rank uses the GPU of its local rank (torchrun's LOCAL_RANK), one GPU per process."""
    if device.type != "cuda" or not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if local >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible on "
                          f"{socket.gethostname()}; start at most that many processes per node "
                          f"(torchrun --nproc_per_node)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def resolve_device(requested: str) -> torch.device:
    """The device a search asks for ("auto", "cpu", "cuda", "cuda:N"), checked against this machine (the
    config itself checks only the spelling); under torchrun a GPU rank takes the GPU of its local rank."""
    if requested == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda' (optionally 'cuda:N'), got {requested!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {requested!r}")
    return local_device(device) if device.index is None else device


def dispatch_settings(backend: str, thresholds: Dict[str, float], device: torch.device
                      ) -> Tuple[str, Dict[str, float]]:
    """What config.json records of how the masked layers compute: the backend asked for (`backend`, or with
    "auto" FASTTICKET_BACKEND's value; "auto" resolves by the recorded device and whether triton imports,
    fastticket.sparse.backend), checked to run on `device`, and the dispatch thresholds overridden by
    FASTTICKET_DENSE_THRESHOLD_<OP> ({op: value}, those that differ from the kernels' defaults). Given
    `thresholds` must be the environment's (the kernels read the variables, not the config)."""
    from fastticket.kernels.dispatch import DENSE_THRESHOLDS, dense_threshold
    from fastticket.sparse.backend import requested_backend, resolve_backend, use_backend
    try:
        requested = backend if backend != "auto" else requested_backend()
        with use_backend(requested):
            resolve_backend(device)  # one clear line now if it cannot run here, not at the first layer
        overrides = {op: dense_threshold(op) for op in DENSE_THRESHOLDS if dense_threshold(op) != DENSE_THRESHOLDS[op]}
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if thresholds and thresholds != overrides:
        names = ", ".join(f"FASTTICKET_DENSE_THRESHOLD_{op.upper()}={v:g}" for op, v in sorted(thresholds.items()))
        raise ConfigError(f"dense_thresholds {thresholds} are not those in effect ({overrides or 'the defaults'}): "
                          f"the kernels read them from the environment; set {names}")
    return requested, overrides


@contextlib.contextmanager
def session(mode: str, backend: str, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
            ) -> Iterator[Context]:
    """The search's Context for the duration of a search: the process group is joined from torchrun's
    environment (or an existing one is used) and left again if this call joined it. No rank waits for a
    silent peer longer than `timeout_s` (fastticket.lottery.peers)."""
    joined = False
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend_for(backend, device), timeout=datetime.timedelta(seconds=timeout_s))
        joined = True
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        context = Context(rank, world, int(os.environ.get("LOCAL_RANK", "0") or 0), mode,
                          PeerWatch(rank, world, timeout_s, stopping=stop.check).start())
    else:
        context = Context(mode=mode)
    left = "failed"
    try:
        yield context
        left = "done"
    except BaseException as exc:
        lost = None
        if context.peers is not None:
            context.peers.quiet()
            lost = context.peers.lost_error(exc)
        if lost is not None or isinstance(exc, StoppedError):
            # A peer is gone (or may still be training): destroying the group could wait for it forever.
            left, joined = "stopped" if lost is None else "failed", False
            if lost is not None:
                stop.check()  # this rank was asked to stop too: that is what it says
                raise lost from None
        # An error every rank raised together (Context.agree): leave together, or a rank destroying its
        # group after another has exited can wait forever (seen with torch 2.5's gloo). Any other error is
        # this rank's alone, and torchrun stops the others when it exits.
        if joined and getattr(exc, _AGREED, False):
            dist.barrier()
        raise
    finally:
        if context.peers is not None:
            context.peers.close(left)
        if joined:
            dist.destroy_process_group()


def check_same_settings(context: Context, settings: str, describe: Callable[[str, str], str]) -> None:
    """Every rank must run the same search: compare each rank's `settings` (the config as JSON) with rank 0's;
    `describe(rank0, other)` says how they differ."""
    if not context.active:
        return
    every = context.gather(settings)
    for rank, other in enumerate(every):
        if other != every[0]:
            raise _agreed(ConfigError(f"rank {rank} was started with other settings than rank 0 "
                                      f"({describe(every[0], other)}); every rank must get the same command line"))


def prefixed(text: str, context: Context) -> str:
    """A message as a rank other than 0 prints it (so the lines of several ranks can be told apart)."""
    return f"[rank {context.rank}] {text}" if context.active and not context.main else text


__all__: Sequence[str] = ("Context", "SOLO", "launched", "env_rank", "backend_for", "resolve_device",
                          "local_device", "session", "check_same_settings", "prefixed")
