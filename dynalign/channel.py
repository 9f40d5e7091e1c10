"""The learner's command channel: one small actor the driver and every learner rank share.

The driver does not hand control to Ray Train's ``fit()``: it submits a command (train a batch,
export weights, save), every rank takes it from its queue, and the results come back one per rank.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

_RESTARTED = "learner group restarted"  # the channel's answer to commands the old group never finished


class Channel:
    """Fan commands out to every rank, gather one result per rank.

    Ray Train restarts the whole group when a rank dies (``learner.max_failures``). The new group
    joins under a new token: the channel drops what the old group left behind (queued commands,
    partial results) and answers every command, waiting or new, with ``_RESTARTED`` until the
    driver acknowledges the restart. So the driver never keeps driving a group that silently went
    back to its last checkpoint."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group_token, self.restarts, self.acknowledged = None, 0, 0
        self.results: dict[int, Any] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.pending, self.next_seq = self._queues(), 0

    def _queues(self) -> list[asyncio.Queue]:
        return [asyncio.Queue() for _ in range(self.world_size)]

    async def join(self, rank: int, token: str) -> None:
        if token == self.group_token:
            return
        if self.group_token is not None:  # a new group: Ray Train restarted the learner
            self.restarts += 1
            self.pending = self._queues()  # the old group's waiters keep the old queues
            for seq, event in self.done.items():
                self.results[seq] = _RESTARTED
                event.set()
        self.group_token = token

    async def acknowledge_restart(self) -> None:
        self.acknowledged = self.restarts

    async def submit(self, name: str, args: tuple) -> int:
        self.next_seq += 1
        seq = self.next_seq
        self.results[seq], self.done[seq] = {}, asyncio.Event()
        if self.restarts != self.acknowledged:
            self.results[seq] = _RESTARTED
            self.done[seq].set()
        else:
            for queue in self.pending:
                queue.put_nowait((seq, name, args))
        return seq

    async def next_command(self, rank: int, token: str) -> tuple[int, str, tuple]:
        if token != self.group_token:  # a rank of a group Ray Train has replaced
            return (0, "stop", ())
        return await self.pending[rank].get()

    async def put_result(self, seq: int, rank: int, token: str, result: Any) -> None:
        if token != self.group_token or seq not in self.done or self.done[seq].is_set():
            return  # an old group's answer, or one for a command already answered as restarted
        self.results[seq][rank] = result
        if len(self.results[seq]) == self.world_size:
            self.done[seq].set()

    async def get_results(self, seq: int) -> list[Any] | str:
        await self.done[seq].wait()
        by_rank, _ = self.results.pop(seq), self.done.pop(seq)
        return _RESTARTED if by_rank == _RESTARTED else [by_rank[rank] for rank in range(self.world_size)]


CommandChannel = ray.remote(num_cpus=0)(Channel)  # the actor the driver and the ranks share
