"""Thin helpers over torch.distributed, usable whether or not a process group exists.

Under ``torchrun`` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup`
initialises the default process group (gloo on CPU, nccl on CUDA) and returns the device
for this rank. Without torchrun every helper degrades to the single-process behaviour, so
the training code has one path.

Data-parallel sampling. DistributedDataParallel only averages the gradients of what goes
through its ``forward``, and a flow's ``forward`` is ``log_prob``. Variational training
draws samples instead, so the flow is wrapped as ``DDP(SampleModule(flow))`` (see
:func:`wrap_sampler`), whose forward is ``flow.sample``; :func:`unwrap` gets the bare flow
back (checkpoints always hold the bare flow's ``state_dict``, the same keys as a
single-process run).

Random streams per rank. Every rank draws its own share of the global batch with its own
``torch.Generator``: rank 0 (and a single-process run, the same stream) is seeded with
``SeedSequence([seed])`` and rank r > 0 with ``SeedSequence([seed, r])`` (:func:`rank_seed`), all
mixed the same way. A stream
started afresh on resume (a rank the checkpoint has no state for) is seeded with
``SeedSequence([seed, r, epoch])``.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the only rank that writes logs, figures and checkpoints)."""
    return rank() == 0


def _local_cuda(index: int | None = None) -> torch.device:
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    return torch.device("cuda", index)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is available, else cpu; 'cpu' and 'cuda:k' as given;
    'cuda' → cuda:LOCAL_RANK (so that under torchrun every rank of a node gets its own GPU).

    Raises:
        ValueError: an unknown device string, or CUDA requested where there is none.
    """
    if device == "auto":
        return _local_cuda() if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:k', got device={device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:k', got device={device!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = _local_cuda()
    return dev


def setup(device: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    dev = resolve_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend=backend)
    return dev


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup-limited containers report theirs)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cpus(seconds: float = 0.25) -> float:
    """How many of this process's usable CPUs other processes keep busy, measured over ``seconds``
    from /proc/stat (Linux; the 1-minute load average elsewhere). This process is idle meanwhile."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()

    def read() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                    v = [int(x) for x in vals[:8]]
                    out[int(name[3:])] = (sum(v), v[3] + v[4])  # total, idle + iowait
        return out

    try:
        a = read()
        time.sleep(seconds)
        b = read()
    except (OSError, ValueError):
        return min(float(os.getloadavg()[0]), float(usable_cpus())) if hasattr(os, "getloadavg") else 0.0
    busy = 0.0
    for c in a.keys() & b.keys():
        total, idle = b[c][0] - a[c][0], b[c][1] - a[c][1]
        busy += (total - idle) / total if total > 0 else 0.0
    return busy


def default_threads(local_processes: int = 1) -> tuple[int, str]:
    """A safe number of torch CPU threads, and why.

    OpenMP threads that share a core with another job spin-wait at every parallel region (on a
    2-core machine with one other job: 14.2 s per epoch instead of 0.46 s; README). So: the
    explicit ``OMP_NUM_THREADS`` if set; else this process's share of the CPUs that are idle now
    (usable CPUs minus those other processes keep busy, rounded up, divided among the
    ``local_processes`` ranks on this machine), at least 1.
    """
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    usable = usable_cpus()
    busy = busy_cpus()
    free = max(1, usable - math.ceil(busy - 0.25))  # a quarter of a CPU of background noise is free
    n = max(1, free // max(1, local_processes))
    return n, f"{usable} usable CPU(s), {busy:.1f} busy with other work"


def setup_run(device: str = "auto", threads: int | None = None, tf32: bool = False,
              verbose: bool = False) -> torch.device:
    """What every driver does first: CPU threads, process group (under torchrun), device, TF32.

    Args:
        device: as in :func:`resolve_device`.
        threads: torch CPU threads (None: :func:`default_threads`, chosen from the idle CPUs).
        tf32: allow TF32 matmuls and convolutions on CUDA (faster, ~1e-3 relative precision).
        verbose: print the thread count and why (rank 0).
    """
    if threads:
        why = "--threads"
    else:
        threads, why = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(int(threads))
    if verbose and int(os.environ.get("RANK", 0)) == 0:
        print(f"threads: {threads} ({why}; --threads N to override)")
    dev = setup(device)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def cleanup() -> None:
    """Tear down the process group once every rank has arrived (a barrier first: a rank that
    destroys its gloo group while another still finishes its last writes can abort the other
    at exit with 'terminate called without an active exception')."""
    if is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def local_share(global_batch: int) -> int:
    """This rank's part of a global batch (which must divide evenly).

    Raises:
        ValueError: the global batch is not a multiple of the world size.
    """
    w = world_size()
    if global_batch % w:
        raise ValueError(f"batch size {global_batch} must be a multiple of the number of processes ({w})")
    return global_batch // w


def all_gather(t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor (same shape on every rank) along dim 0, in rank order."""
    if not is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of a tensor over ranks (a new tensor; the input is untouched)."""
    if not is_initialized():
        return t
    out = t.detach().clone()
    tdist.all_reduce(out)
    return out


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under nccl, else the CPU."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a list of numbers over ranks (the list itself in one process).

    Used for decisions all ranks must share (stop on a signal, wall-clock budget): a flag
    raised on any rank is raised on all, so no rank leaves the loop while the others wait
    for it in a collective.
    """
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """A picklable object from every rank, in rank order (``[obj]`` in one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Data-parallel sampling
# ---------------------------------------------------------------------------------------------


class SampleModule(nn.Module):
    """A sampler whose ``forward`` draws: ``SampleModule(flow)(n, generator)`` is ``flow.sample(n, generator)``.

    DistributedDataParallel averages the gradients of whatever runs through its ``forward``;
    wrapping a flow in this module makes that the reparametrised sampling of variational
    training. Its parameters are the flow's (``state_dict`` keys gain a ``flow.`` prefix;
    use :func:`unwrap` to get the flow back).

    Args:
        flow: anything with ``sample(n, generator=None, ...) -> (x, logp)``.
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.flow.sample(n, generator=generator, **kwargs)

    def sample(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self(n, generator=generator, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or :class:`SampleModule` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, SampleModule):
            model = model.flow
        else:
            return model


def wrap_sampler(flow: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``DDP(SampleModule(flow))`` when more than one process runs, else ``flow`` itself.

    DDP broadcasts rank 0's parameters at construction (so every rank starts from the same
    model) and averages gradients in the backward pass of each draw. Buffers are not
    broadcast: the flows' buffers are constant tables (group permutations and signs).
    """
    if world_size() == 1:
        return flow
    device = torch.device(device) if device is not None else next(flow.parameters()).device
    # no buffer broadcast before every forward (torch >= 2.13 names it forward_sync_buffers)
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(SampleModule(flow), device_ids=[device] if device.type == "cuda" else None,
                                   **no_sync)


# ---------------------------------------------------------------------------------------------
# Random streams per rank
# ---------------------------------------------------------------------------------------------


def rank_seed(seed: int, rank_: int | None = None, epoch: int | None = None) -> int:
    """Seed of rank r's random stream.

    Rank 0 (the single-process stream) gets the first 64-bit word of
    ``numpy.random.SeedSequence([seed])``, rank r > 0 that of ``SeedSequence([seed, r])``. With
    ``epoch``, ``SeedSequence([seed, r, epoch])``, for every rank: a fresh stream for a rank
    that starts at ``epoch`` with no saved state (resume on more ranks than wrote the
    checkpoint). Negative seeds are taken modulo 2⁶⁴.

    Args:
        seed: the run's seed.
        rank_: the rank (default: this process's).
        epoch: the epoch a fresh stream starts at, or None for the stream of a new run.
    """
    r = rank() if rank_ is None else int(rank_)
    entropy = [int(seed) % 2**64] + ([] if epoch is None and r == 0 else [r]) + ([] if epoch is None else [int(epoch)])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def rank_generator(seed: int, device: torch.device | str = "cpu", rank_: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rank_seed` ``(seed, rank)``."""
    return torch.Generator(device=torch.device(device)).manual_seed(rank_seed(seed, rank_))
