"""Thin helpers over torch.distributed, usable whether or not a process group exists.

Under ``torchrun`` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup`
initialises the default process group (gloo on CPU, nccl on CUDA) and returns the device
for this rank. Without torchrun every helper degrades to the single-process behaviour, so
the training code has one path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import Tensor


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the only rank that writes logs, figures and checkpoints)."""
    return rank() == 0


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is available, else cpu; 'cpu', 'cuda', 'cuda:k' as given.

    Raises:
        ValueError: an unknown device string, or CUDA requested where there is none.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:k', got device={device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:k', got device={device!r}")
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


def cleanup() -> None:
    if is_initialized():
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


def local_slice(global_batch: int) -> slice:
    """Rows of a global batch owned by this rank."""
    b = local_share(global_batch)
    return slice(rank() * b, (rank() + 1) * b)


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


def global_mean(t: Tensor) -> Tensor:
    """Mean over all elements on all ranks (detached)."""
    t = t.detach()
    s = all_reduce_sum(torch.stack([t.sum(), torch.tensor(float(t.numel()), dtype=t.dtype, device=t.device)]))
    return s[0] / s[1]
