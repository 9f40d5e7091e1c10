"""dynalign.memory: the resident high-water mark a learner rank reports per phase."""

from __future__ import annotations

import ctypes

from dynalign.memory import memory_gib, reset_peak


def test_peak_follows_an_allocation_and_resets_after_it():
    reset_peak()
    before = memory_gib()
    block = bytearray(300 * 2**20)  # written (zeroed) pages: resident
    during = memory_gib()
    del block
    ctypes.CDLL(None).malloc_trim(0)  # hand the freed pages back, as a long-lived rank's allocator may not
    after_free = memory_gib()
    reset_peak()
    after_reset = memory_gib()
    assert during["rss_gib"] - before["rss_gib"] > 0.25
    assert after_free["rss_peak_gib"] > during["rss_gib"] - 0.01  # the peak remembers the block
    assert after_reset["rss_peak_gib"] < after_free["rss_peak_gib"] - 0.25  # a new phase starts from now
    assert 0 <= after_reset["rss_shmem_gib"] <= after_reset["rss_gib"] <= after_reset["rss_peak_gib"] + 1e-3


_HEAP_OR_MAP = """
import ctypes, sys
from dynalign.memory import fix_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallinfo2.restype = Info
fix_mmap_threshold(int(sys.argv[1]))
libc.free(libc.malloc(24 * 2**20))  # glibc's own threshold rises to a freed mapped block's size
mapped = libc.mallinfo2().hblks  # blocks living in their own mapping
block = libc.malloc(4 * 2**20)
print(libc.mallinfo2().hblks - mapped)
"""


def test_a_fixed_mmap_threshold_keeps_large_blocks_out_of_the_heap():
    """A ZeRO-3 rank on CPU fixes the threshold (learner.host_mmap_threshold_mb): with glibc's own,
    a 4 MiB block allocated after a 24 MiB one was freed comes from the heap, which keeps it once
    freed; with the threshold fixed at 1 MiB it gets its own mapping."""
    import subprocess
    import sys

    def mapped_blocks(threshold: int) -> int:
        run = subprocess.run([sys.executable, "-c", _HEAP_OR_MAP, str(threshold)], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert mapped_blocks(0) == 0
    assert mapped_blocks(2**20) == 1


def test_the_mmap_threshold_is_fixed_for_zero3_on_cpu_unless_configured():
    from dynalign.learner_config import LearnerConfig

    auto = LearnerConfig()
    assert [auto.mmap_threshold_bytes(stage) for stage in (0, 1, 2, 3)] == [0, 0, 0, 2**20]
    assert LearnerConfig(num_gpus_per_rank=1).mmap_threshold_bytes(3) == 0  # GPU tensors: torch's caching allocator
    assert LearnerConfig(host_mmap_threshold_mb=0).mmap_threshold_bytes(3) == 0
    assert LearnerConfig(host_mmap_threshold_mb=4).mmap_threshold_bytes(2) == 4 * 2**20
