"""MNIST for density estimation: IDX files, checksums, download, and the MAF preprocessing.

The command line of :mod:`latticeflow.mnist`:

    python -m latticeflow.mnist --download [--data-dir DIR] [--mirror URL ...] [--force]
    python -m latticeflow.mnist --verify [--data-dir DIR]     # OK/BAD per file, exit status 1 if any is bad
    python -m latticeflow.mnist --baseline [--seed S]         # the Gaussian baseline's NLL and bits/dim

Exit statuses: 0 done, 1 missing, corrupt or undownloadable files (one ``error:`` line), 2 no
action given (the help is printed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import files
from .baseline import baseline_report
from .files import (
    DEFAULT_MIRRORS,
    MNISTDownloadError,
    MNISTFormatError,
    download_mnist,
    find_mnist_dir,
    verify_checksums,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m latticeflow.mnist``."""
    parser = argparse.ArgumentParser(prog="python -m latticeflow.mnist", description=__doc__.split("\n")[0])
    parser.add_argument("--download", action="store_true", help="download the four files")
    parser.add_argument("--verify", action="store_true", help="check the MD5 of the unpacked files")
    parser.add_argument("--baseline", action="store_true", help="Gaussian baseline NLL and bits/dim")
    parser.add_argument("--data-dir", default=None, help="default: data/ at the repo root")
    parser.add_argument("--mirror", action="append", default=None, help="base URL to try (repeatable)")
    parser.add_argument("--force", action="store_true", help="download even present files")
    parser.add_argument("--seed", type=int, default=0, help="with --baseline: train/validation split seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m latticeflow.mnist [--download] [--verify] [--baseline] [--data-dir DIR]``.

    Returns:
        the exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.download or args.verify or args.baseline):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.download:
            mirrors = args.mirror or DEFAULT_MIRRORS
            directory = download_mnist(args.data_dir, mirrors=mirrors, force=args.force)
            print(f"MNIST files ready in {directory}")
        if args.verify:
            ok = verify_checksums(args.data_dir)
            directory = find_mnist_dir(args.data_dir)
            for name, good in ok.items():
                print(f"{'OK ' if good else 'BAD'} {directory / name}[.gz]  (expected MD5 {files.MNIST_MD5[name]})")
            if not all(ok.values()):
                return 1
        if args.baseline:
            print(baseline_report(args.data_dir, args.seed, noise_seed=1))
    except (FileNotFoundError, MNISTFormatError, MNISTDownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
