"""Checkpoints: atomic writes, safe loading, and RNG state capture.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` (a pickled checkpoint would be code). It is written
to a temporary file in the same folder and renamed over the target, so a crash while
writing never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runs import umask_mode


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model at hand."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; a checkpoint gets the mode of the other outputs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


#: Which driver writes which kind of checkpoint (named in errors when one is handed to the other).
DRIVERS = {"ising": "python -m models.ising", "mnist": "python -m models.mnist", "phi4": "python -m models.phi4"}


def checkpoint_kind(state: dict[str, Any]) -> str | None:
    """``"ising"``, ``"mnist"`` or None: the ``kind`` a trainer recorded, else read off the config
    (checkpoints written before ``kind`` existed)."""
    kind = state.get("kind")
    if isinstance(kind, str):
        return kind
    config = state.get("config") or {}
    if "L" in config and "beta" in config:
        return "ising"
    if "n_validation" in config or "patience" in config:
        return "mnist"
    return None


def check_kind(state: dict[str, Any], path: str | os.PathLike, kind: str) -> None:
    """Raise :class:`CheckpointError` naming the file and its kind when it is not a ``kind`` checkpoint."""
    found = checkpoint_kind(state)
    if found != kind:
        names = {"ising": "an Ising checkpoint", "mnist": "an MNIST checkpoint", "phi4": "a φ⁴ checkpoint"}
        what = names.get(found, f"a {found} checkpoint") if found else "not a checkpoint of a known kind"
        hint = f" (written by {DRIVERS[found]}; resume it there)" if found in DRIVERS else ""
        raise CheckpointError(f"{path} is {what}{hint}, not {names.get(kind, f'a {kind} checkpoint')}")


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, foreign or incomplete file, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for corrupt files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a latticeflow checkpoint): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a latticeflow checkpoint")
    return state


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Capture torch, CUDA, numpy and python RNG states (and ``generator``'s) as safe-loadable objects."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        out["generator"] = generator.get_state()
    return out


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs restores the devices that exist here
        for i, s in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
