"""How many torch threads a command uses, and why: one rule for every `tunesmith` command.

torch's OpenMP threads wait for each other by spinning, and on a CPU that other processes already keep
busy that costs far more than it gains: on this project's shared 2-core machine an 8-step `tunesmith
train` ran at 62.6 tokens/s with the default 2 threads against 168.5 with 1, next to one competing
process (issue 18), and a 60-token forward of the default model took 30 s with 2 threads and 0.6 s with
1 at load average 10. So: when the 1-minute load average already reaches the number of cores, use one
thread. An explicit OMP_NUM_THREADS is the user's choice and is left alone; so is an idle machine.

    >>> choice = apply_thread_rule()       # doctest: +SKIP
    >>> choice.line()                      # doctest: +SKIP
    'threads: 1 torch thread (the CPU is busy: load average 3.1 on 2 cores; OMP_NUM_THREADS=N chooses)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ThreadChoice", "apply_thread_rule", "last_choice"]

_last: ThreadChoice | None = None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str
    changed: bool  # True when the rule lowered the count

    def line(self) -> str:
        plural = "" if self.threads == 1 else "s"
        return f"threads: {self.threads} torch thread{plural} ({self.reason})"


def apply_thread_rule() -> ThreadChoice:
    """Set torch's thread count by the rule above; return what was chosen and why (also `last_choice()`)."""
    global _last
    import torch

    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    changed = False
    if "OMP_NUM_THREADS" in os.environ:
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif threads == 1:
        reason = "torch's default here"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load >= cores:
            torch.set_num_threads(1)
            threads, changed = 1, True
            reason = f"the CPU is busy: load average {load:.1f} on {cores} cores; OMP_NUM_THREADS=N chooses"
        else:
            reason = f"torch's default; load average {load:.1f} on {cores} cores"
    _last = ThreadChoice(threads, reason, changed)
    return _last


def last_choice() -> ThreadChoice | None:
    """What `apply_thread_rule` chose last in this process (None: it has not run)."""
    return _last
