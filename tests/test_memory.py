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
