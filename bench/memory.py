"""Peak memory of a benchmark process, two ways.

`ru_maxrss` (peak resident set) counts the pages of memory-mapped weight files: transformers maps
safetensors files, so every weight read once stays counted for as long as the mapping lives, though
those pages are clean file cache that the kernel takes back under pressure. `AnonPeak` samples the
anonymous memory (RssAnon in /proc/self/status: what the process itself allocated, which must fit
in RAM) every few milliseconds in a thread, so a peak between two steps is seen too.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class AnonPeak:
    """The largest RssAnon seen since `start()`, sampled every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self._stop.wait(self.interval)

    def start(self) -> AnonPeak:
        self._thread.start()
        return self

    def stop(self) -> float:
        """The peak in GiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return self.peak / 2**30
