"""Peak memory of this process: host resident set (Linux VmHWM) and, on GPUs, torch's allocator.

The peak can be reset, so that a phase (a train step, a save, a sync) is measured on its own; the
learner reports it per rank in its metrics and ``benchmarks/bench_memory.py`` compares it with the
planner's estimate.
"""

from __future__ import annotations

import resource
from pathlib import Path

GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> None:
    """Start a new peak: the kernel's resident high-water mark (writing 5 to clear_refs) and
    torch's CUDA peak counters."""
    import torch

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_gib() -> dict[str, float]:
    """Resident, peak resident (since start or the last ``reset_peak``) and shared resident host
    memory (GiB), plus the GPU allocator's peak where there is a GPU."""
    import torch

    rss_kib = _status_kib("VmRSS") or 0
    peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"rss_gib": rss_kib * 1024 / GIB, "rss_peak_gib": peak_kib * 1024 / GIB,
              # shared memory mapped in (Ray's object store among it): counted in RSS, not ours alone
              "rss_shmem_gib": (_status_kib("RssShmem") or 0) * 1024 / GIB}
    if torch.cuda.is_available():
        report["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return report
