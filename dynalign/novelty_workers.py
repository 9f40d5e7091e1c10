"""Worker backends of ``NoveltyFilter(num_workers > 1)``: one stateful ``Shard`` of the pool per
worker, a dedicated single-process ``ProcessPoolExecutor`` each ("spawn" start method, so scripts
need the usual ``if __name__ == "__main__":`` guard) or, when Ray is initialised, one Ray actor
each. ``step(new_entries, block)`` ships each worker its new pool entries and the block of
candidates and returns every worker's ``Shard.block_step``.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

from dynalign.novelty_index import Shard

_WORKER_SHARD: Shard | None = None


def _proc_init() -> None:
    global _WORKER_SHARD
    _WORKER_SHARD = Shard()


def _proc_step(new_entries: list[tuple[int, list[int]]], block, part: int, nparts: int):
    shard = _WORKER_SHARD
    assert shard is not None
    for g, ids in new_entries:
        shard.add(g, ids)
    return shard.block_step(block, part, nparts)


class ProcessBackend:
    def __init__(self, num_workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._execs = [
            ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_proc_init)
            for _ in range(num_workers)
        ]

    def step(self, new_entries, block):
        n = len(self._execs)
        futs = [
            ex.submit(_proc_step, entries, block, w, n)
            for w, (ex, entries) in enumerate(zip(self._execs, new_entries, strict=True))
        ]
        return [f.result() for f in futs]

    def close(self) -> None:
        for ex in self._execs:
            ex.shutdown(wait=True, cancel_futures=True)
        self._execs = []


class RayShard:
    def __init__(self) -> None:
        self.shard = Shard()

    def step(self, new_entries, block, part: int, nparts: int):
        for g, ids in new_entries:
            self.shard.add(g, ids)
        return self.shard.block_step(block, part, nparts)


class RayBackend:
    def __init__(self, num_workers: int) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_cpus=1)(RayShard)
        self._actors = [actor_cls.remote() for _ in range(num_workers)]

    def step(self, new_entries, block):
        block_ref = self._ray.put(block)
        n = len(self._actors)
        refs = [
            a.step.remote(entries, block_ref, w, n)
            for w, (a, entries) in enumerate(zip(self._actors, new_entries, strict=True))
        ]
        return self._ray.get(refs)

    def close(self) -> None:
        for a in self._actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._actors = []


def ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import ray just to find out
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())
