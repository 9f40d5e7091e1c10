"""Peak memory of this process: host resident set (Linux VmHWM) and, on GPUs, torch's allocator.

The peak can be reset, so that a phase (a train step, a save, a sync) is measured on its own; the
learner reports it per rank in its metrics and ``benchmarks/bench_memory.py`` compares it with the
planner's estimate. The kernel's peak counts shared pages too (Ray's object store, mapped into a
rank while it writes a sync's buckets), so on request a sampler thread also tracks the peak of the
process's own (anonymous) memory.
"""

from __future__ import annotations

import ctypes
import resource
import threading
from pathlib import Path

GIB = 2**30
_SAMPLE_S = 0.002


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _AnonPeak(threading.Thread):
    """Samples RssAnon every 2 ms until stopped; ``peak_kib`` is the largest seen."""

    def __init__(self):
        super().__init__(daemon=True, name="anon-peak")
        self.peak_kib, self.stopped = _status_kib("RssAnon") or 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(_SAMPLE_S):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon") or 0)


_sampler: _AnonPeak | None = None


def release_free_memory() -> None:
    """Hand memory freed inside the process back to the OS (glibc keeps it otherwise: after a
    model load a rank's RSS stayed ~0.4 GiB above what it used)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass  # not glibc


def fix_mmap_threshold(threshold_bytes: int) -> None:
    """glibc: allocations of ``threshold_bytes`` or more get their own mapping, unmapped when freed
    (0: leave glibc's own threshold, which rises to each large block freed, up to 32 MiB, so that
    later blocks of that size come from the heap, which keeps them resident once freed)."""
    M_MMAP_THRESHOLD = -3  # malloc.h
    if threshold_bytes > 0:
        try:
            ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold_bytes)
        except (AttributeError, OSError):
            pass  # not glibc


def reset_peak(sample_anon: bool = False) -> None:
    """Start a new peak: the kernel's resident high-water mark (writing 5 to clear_refs), torch's
    CUDA peak counters and, with ``sample_anon``, a sampler of the process's own memory."""
    global _sampler
    import torch

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if _sampler is not None:
        _sampler.stopped.set()
        _sampler = None
    if sample_anon:
        _sampler = _AnonPeak()
        _sampler.start()


def memory_gib() -> dict[str, float]:
    """Resident, peak resident (since start or the last ``reset_peak``) and shared resident host
    memory (GiB), the sampled peak of the process's own memory when a sampler runs, and the GPU
    allocator's peak where there is a GPU."""
    import torch

    rss_kib = _status_kib("VmRSS") or 0
    peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"rss_gib": rss_kib * 1024 / GIB, "rss_peak_gib": peak_kib * 1024 / GIB,
              "rss_anon_gib": (_status_kib("RssAnon") or 0) * 1024 / GIB,
              # shared memory mapped in (Ray's object store among it): counted in RSS, not ours alone
              "rss_shmem_gib": (_status_kib("RssShmem") or 0) * 1024 / GIB}
    if _sampler is not None:
        report["anon_peak_gib"] = max(_sampler.peak_kib, _status_kib("RssAnon") or 0) * 1024 / GIB
    if torch.cuda.is_available():
        report["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return report
