"""A search across processes launched by torchrun (or SLURM with the same environment): who this process is,
and the few collectives the search needs, all through torch.distributed (nothing home-made on the wire).

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
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from fastticket.errors import ConfigError, FastTicketError

# Trials mode waits at a barrier while another rank finishes its arms of the level: a level of a big model
# can take hours. A rank that dies ends the run through torchrun (it stops the other workers), not this.
_TIMEOUT = datetime.timedelta(hours=24)

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
        if self.active:
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


_current = Context()
_AGREED = "raised_by_every_rank"


def _agreed(error: Exception) -> Exception:
    """Mark an error that every rank raises at the same point (see `session`)."""
    setattr(error, _AGREED, True)
    return error


def current() -> Context:
    """The context of the search running in this process (one process, rank 0, when none is)."""
    return _current


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


@contextlib.contextmanager
def session(mode: str, backend: str, device: torch.device) -> Iterator[Context]:
    """The search's Context for the duration of a search: the process group is joined from torchrun's
    environment (or an existing one is used) and left again if this call joined it."""
    global _current
    joined = False
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend_for(backend, device), timeout=_TIMEOUT)
        joined = True
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), mode)
    else:
        context = Context(mode=mode)
    previous, _current = _current, context
    try:
        yield context
    except Exception as exc:
        # An error every rank raised together (Context.agree): leave together, or a rank destroying its
        # group after another has exited can wait forever (seen with torch 2.5's gloo). Any other error is
        # this rank's alone, and torchrun stops the others when it exits.
        if joined and getattr(exc, _AGREED, False):
            dist.barrier()
        raise
    finally:
        _current = previous
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


def prefixed(text: str, context: Optional[Context] = None) -> str:
    """A message as a rank other than 0 prints it (so the lines of several ranks can be told apart)."""
    context = context or current()
    return f"[rank {context.rank}] {text}" if context.active and not context.main else text


__all__: Sequence[str] = ("Context", "current", "launched", "env_rank", "backend_for",
                          "local_device", "session", "check_same_settings", "prefixed")
