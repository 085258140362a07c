"""What every command line of latticeflow shares: value parsers, exit statuses, and error reporting.

Exit statuses (the same for ``python -m models.ising``, ``python -m models.mnist`` and
``python -m analysis``):

    0    finished, or stopped by the ``--max-minutes`` budget (the output says which)
    1    training diverged (the message names the epoch; the log and a good checkpoint are kept)
    2    a user error: a bad flag or value, an output folder that holds another run, a checkpoint
         of the wrong kind; one ``error:`` line, nothing written
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: 128 + the signal, as shells do; the
         output prints the command that resumes the run
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Value parsers for argparse: a bad value becomes "error: argument --x: ..." and exit status 2
# ---------------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse ``type``: a number strictly between 0 and 1."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def beta_value(text: str) -> float | str:
    """An argparse ``type`` for an inverse temperature: a number > 0, or ``critical``."""
    if text.lower() in ("critical", "c", "beta_c"):
        return "critical"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'critical', got {text!r}") from None


def checkpoint_file(text: str) -> Path:
    """An argparse ``type``: an existing checkpoint file, or a run folder holding ``checkpoint.pt``."""
    path = Path(text)
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            return path / "checkpoint.pt"
        raise argparse.ArgumentTypeError(f"{text} is a folder without a checkpoint.pt")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no checkpoint file {text}")
    return path


# ---------------------------------------------------------------------------------------------
# Running a driver
# ---------------------------------------------------------------------------------------------


def exit_status(stop_reason: str | None, stop_signal: int | None = None) -> int:
    """The exit status of a run that ended for ``stop_reason`` (see the module docstring)."""
    if stop_reason == "signal":
        return 128 + int(stop_signal or 2)
    if stop_reason == "diverged":
        return EXIT_DIVERGED
    return EXIT_OK


def run_cli(main: Callable[[Sequence[str] | None], dict], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Run a driver's ``main(argv)`` and turn its outcome into an exit status.

    User errors (``ValueError``, ``FileNotFoundError``, bad checkpoints, occupied folders) print
    one ``error:`` line with the usage (status 2); a diverged run prints its message (status 1);
    a run stopped by a signal returns 128 + the signal. ``main`` returns its summary dict, with
    ``stop_reason`` and ``stop_signal``.
    """
    from .train import TrainingDiverged

    try:
        summary = main(argv)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return exit_status(summary.get("stop_reason"), summary.get("stop_signal"))


def add_run_arguments(parser: argparse.ArgumentParser, kind: str, *,
                      resume: Callable[[str], Path] = checkpoint_file,
                      resume_help: str = "continue the run of this checkpoint.pt (or run folder)",
                      budget_help: str = "wall-clock budget (exit status 0)",
                      plot_help: str = "skip the figures") -> argparse._ArgumentGroup:
    """The flags every training driver shares (the "run" group): output folder, resume, force,
    budget, device, TF32, threads, figures, progress bar. Returns the group, for driver-specific ones."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help=f"output folder [a new runs/{kind}/<date>-<time>, linked as "
                                               f"runs/{kind}/latest; with --resume: the checkpoint's folder]")
    g.add_argument("--resume", type=resume, default=None, help=resume_help)
    g.add_argument("--force", action="store_true", help="replace the run already in --out (its files are deleted)")
    g.add_argument("--max-minutes", type=positive_float, default=None, help=budget_help)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:k [auto]")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPUs")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads [chosen from the idle CPUs, printed at start]")
    g.add_argument("--no-plot", action="store_true", help=plot_help)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return g
