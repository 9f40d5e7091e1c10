"""The learner's command channel, without Ray: fan-out, one result per rank, and what happens when
Ray Train replaces the rank group (a rank died)."""

from __future__ import annotations

import asyncio

from dynalign.channel import _RESTARTED, Channel


def run(coroutine):
    return asyncio.run(coroutine)


async def _serve(channel: Channel, rank: int, token: str, answer) -> None:
    seq, name, args = await channel.next_command(rank, token)
    await channel.put_result(seq, rank, token, answer(name, args))


def test_results_come_back_in_rank_order_once_every_rank_answered():
    async def scenario():
        channel = Channel(world_size=2)
        await channel.join(0, "g1")
        await channel.join(1, "g1")
        seq = await channel.submit("train_step", (7,))
        waiting = asyncio.create_task(channel.get_results(seq))
        await _serve(channel, 1, "g1", lambda name, args: f"rank1 {name} {args[0]}")
        await asyncio.sleep(0)
        assert not waiting.done()  # rank 0 has not answered yet
        await _serve(channel, 0, "g1", lambda name, args: f"rank0 {name} {args[0]}")
        return await waiting

    assert run(scenario()) == ["rank0 train_step 7", "rank1 train_step 7"]


def test_a_new_group_fails_waiting_and_new_commands_until_acknowledged():
    async def scenario():
        channel = Channel(world_size=2)
        for rank in (0, 1):
            await channel.join(rank, "old")
        in_flight = await channel.submit("train_step", ())
        waiting = asyncio.create_task(channel.get_results(in_flight))
        await _serve(channel, 0, "old", lambda *_: "old rank 0")  # rank 1 dies before answering
        await channel.join(1, "new")  # Ray Train's new group
        assert await waiting == _RESTARTED
        await channel.put_result(in_flight, 1, "old", "late")  # a stale answer is ignored
        before_ack = await channel.submit("save_checkpoint", ())
        assert await channel.get_results(before_ack) == _RESTARTED  # never reaches the new ranks
        assert await channel.next_command(0, "old") == (0, "stop", ())  # an old rank is told to stop
        await channel.join(0, "new")
        await channel.acknowledge_restart()
        after_ack = await channel.submit("ping", ())
        for rank in (0, 1):
            await _serve(channel, rank, "new", lambda name, _args, rank=rank: (name, rank))
        return await channel.get_results(after_ack), channel.pending

    results, queues = run(scenario())
    assert results == [("ping", 0), ("ping", 1)]
    assert all(queue.empty() for queue in queues)  # the old group's unserved command was dropped
