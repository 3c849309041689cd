"""Data-parallel training under torchrun: one process per GPU, DistributedDataParallel, one global batch.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; `session` starts the process group from
them (nccl on CUDA, gloo on CPU) and ends it. Without torchrun (WORLD_SIZE unset or 1) every helper here is
a no-op, so single-process training is exactly what it was.

The recipe's train.batch_size is the global batch: each of N ranks takes batch_size / N images of the same
global order, and DDP averages the gradients, so a step sees the mean loss over the global batch, as one
process would.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from soup.errors import SoupError


class RankError(SoupError):
    """A mistake one rank may meet without the others (its GPU, its process group): the rank that meets it
    prints it, since rank 0, which prints every other user error, may not have met it."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SoupError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, which "
                        "sets it") from None


def env_world() -> World:
    """The world torchrun describes in the environment (a world of one without torchrun)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise SoupError(f"RANK={rank} / WORLD_SIZE={size} from the environment make no sense; launch with "
                        "torchrun --nproc_per_node N, or unset them for one process")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def world() -> World:
    """The current world: the live process group's, else the environment's."""
    if initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return env_world()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    return dist.get_backend() if initialized() else None


def is_main() -> bool:
    """Rank 0 alone writes files and prints; true whenever there is one process."""
    return world().main


def rank_device(device: torch.device, w: World | None = None) -> torch.device:
    """Each rank drives its own GPU (cuda:LOCAL_RANK); a CPU stays a CPU."""
    w = w or env_world()
    if not w.distributed or device.type != "cuda":
        return device
    if device.index not in (None, 0) and device.index != w.local_rank:
        raise SoupError(f"train.device={device} pins one GPU, but under torchrun each process uses "
                        "cuda:LOCAL_RANK; set train.device=auto (or cuda)")
    if w.local_rank >= torch.cuda.device_count():
        raise RankError(f"LOCAL_RANK {w.local_rank} but this machine sees {torch.cuda.device_count()} GPUs; "
                        "set torchrun --nproc_per_node to at most the number of GPUs")
    return torch.device("cuda", w.local_rank)


@contextlib.contextmanager
def session(device: torch.device | str = "cpu", timeout_minutes: float = 30.0):
    """Start the process group torchrun describes and end it on the way out; re-entrant (an enclosing
    session is reused), and a no-op for one process."""
    w = env_world()
    if not w.distributed or initialized():
        yield world()
        return
    if not dist.is_available():
        raise SoupError("torch was built without torch.distributed; run one process (without torchrun)")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        device = rank_device(device, w)
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as err:
        raise RankError(f"cannot start the {backend} process group for rank {w.rank} of {w.size} ({err}); "
                        "check MASTER_ADDR/MASTER_PORT or launch with torchrun") from None
    try:
        yield world()
        # gloo can abort a rank whose peers tear down while it still talks to them: leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, w: World | None = None) -> int:
    w = w or world()
    if global_batch % w.size:
        raise SoupError(f"train.batch_size={global_batch} is the global batch and must split evenly over "
                        f"{w.size} processes; set it to a multiple of {w.size} (e.g. --set "
                        f"train.batch_size={max(w.size, global_batch // w.size * w.size)})")
    return global_batch // w.size


def rank_slice(order: list[int], rank: int, size: int) -> list[int]:
    """This rank's share of a global epoch order: every `size`-th item from `rank` on.

    With a per-rank batch of B / size, step k of every rank then draws from global batch k of the order,
    and the ranks' shares of a global batch are disjoint and cover it. The order is first cut to a multiple
    of `size` (the tail of a shuffled order, so other items each epoch), which keeps every rank's last batch
    the same size: DDP's gradient average is then the mean over the global batch there too. With the epoch
    size a multiple of `size` nothing is cut and training sees what one process sees. Like
    DistributedSampler(shuffle=True, drop_last=True), but on soup's (seed, epoch) order, so resume stays
    exact. One process gets the order unchanged."""
    if size == 1:
        return order
    usable = len(order) - len(order) % size
    return order[rank:usable:size]


def rank_count(n: int, size: int) -> int:
    """How many items of an epoch of `n` each rank gets from `rank_slice`."""
    return n // size if size > 1 else n


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module that runs the training step: DDP around `model` when distributed, else `model` itself.
    Save from `model`, never from the wrapper, so checkpoints keep single-process keys."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # static_graph: a trainable parameter the forward never uses (DinoV2's mask_token when nothing is
    # frozen) would otherwise stop DDP at the second step; the graph is the same every step here.
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                   static_graph=True)


def sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, bool]:
    """BatchNorm statistics over the global batch (as one process computes them) on GPUs. torch's
    SyncBatchNorm has no CPU path, so on CPU each rank normalises over its own share of the batch."""
    if not world().distributed or device.type == "cpu":
        return model, False
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return (nn.SyncBatchNorm.convert_sync_batchnorm(model), True) if has_bn else (model, False)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over ranks (the values themselves for one process)."""
    if not world().distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def from_main(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not world().distributed:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world().distributed:
        dist.barrier()
