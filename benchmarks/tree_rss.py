"""The resident memory of a whole benchmark, this process and every process under it, summed (Linux).

`getrusage(RUSAGE_CHILDREN)` reports the largest child's peak, not what the children held together, so a background
thread reads VmRSS of each process in the tree from /proc every `interval` seconds and keeps the largest sum. Pages
that processes share (the torch libraries) count once per process: the sum is an upper bound of what they use."""

from __future__ import annotations

import os
import threading


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a thread that started a process is its parent)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
    except OSError:  # it, or the thread, exited meanwhile
        pass
    return children


def _vm_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 0  # exited, or a zombie (no VmRSS line)


def tree_rss_bytes(root: int | None = None) -> int:
    """VmRSS of `root` (default: this process) and all its descendants, summed, now."""
    total, pending = 0, [os.getpid() if root is None else root]
    while pending:
        pid = pending.pop()
        total += _vm_rss(pid)
        pending.extend(_children(pid))
    return total


class PeakTreeRss:
    """`with PeakTreeRss() as peak:` samples `tree_rss_bytes()` until the block ends; `peak.bytes` is the largest."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.bytes = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        now = tree_rss_bytes()
        self.bytes = max(self.bytes, now)
        return now

    def include(self, nbytes: int) -> None:
        """A total known otherwise (e.g. the RSS before a build plus the builder's own peak, VmHWM)."""
        self.bytes = max(self.bytes, nbytes)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakTreeRss":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
