"""Run by tests/test_distributed.py under torchrun: models/ising.py with a signal delivered to
rank 1 at the worst moment, right after the epoch's stop decision has been agreed.

Rank 1 sends itself SIGINT the instant its all-reduce in ``agree_to_stop`` of epoch
``LATE_SIGNAL_EPOCH`` returns, so its handler runs before the caller looks at the result. All
ranks must still leave the loop together, after the next epoch's agreement.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.ising as mi  # noqa: E402
from latticeflow import distributed as dist  # noqa: E402

EPOCH = int(os.environ["LATE_SIGNAL_EPOCH"])
_calls = 0
_all_reduce_max = dist.all_reduce_max


def _late(values: list[float]) -> list[float]:
    global _calls
    out = _all_reduce_max(values)
    if len(values) != 2:  # not the stop decision [signal, out of time] (e.g. the output-folder claim)
        return out
    _calls += 1
    if _calls == EPOCH and dist.rank() == 1:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode, before the caller's check
    return out


dist.all_reduce_max = _late
if __name__ == "__main__":
    mi.main(sys.argv[1:])
