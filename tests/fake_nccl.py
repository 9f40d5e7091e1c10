"""A fake of what cannot run here (a GPU, NCCL) for the NCCL weight sync's tests.

* ``FakeNcclWire``: the rendezvous and the broadcast. Ranks join a group by (address, port); a
  join blocks until ``world_size`` distinct ranks have joined (as vLLM's ``StatelessProcessGroup``
  + ``PyNcclCommunicator`` do), and refuses a duplicate or out-of-range rank or a different world
  size. A broadcast from rank 0 reaches every other rank, in order.
* ``FakeNcclTransport``: learner rank 0's side, in place of ``nccl_sync.VllmNcclTransport``. It packs
  with vLLM's own ``pack_tensors`` exactly as ``packed_nccl_broadcast_producer`` does, minus the
  CUDA streams.
* ``FakeNcclEngine``: one vLLM instance with ``workers`` workers, answering the worker methods the
  sync calls through ``collective_rpc`` (check_health, init_weight_transfer_engine,
  start/update/finish_weight_update) with vLLM's own dataclasses to parse the payloads, vLLM's
  worker-rank rule, and the receive loop of ``packed_nccl_broadcast_consumer`` (buffers cut from the
  metadata; a buffer whose size differs from what was sent fails, where NCCL would hang).
  Calls run one at a time, in order, like a Ray actor's.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import queue
import threading
import time

import torch


class FakeNcclWire:
    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self.groups: dict[tuple[str, int], FakeNcclGroup] = {}
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []  # (who, what), in the order they happened

    def log(self, who: str, what: str) -> None:
        with self.lock:
            self.events.append((who, what))

    def join(self, address: str, port: int, rank: int, world_size: int) -> FakeNcclGroup:
        with self.lock:
            group = self.groups.setdefault((address, port), FakeNcclGroup(world_size, self.timeout_s))
        group.join(rank, world_size)
        return group


class FakeNcclGroup:
    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.joined: set[int] = set()
        self.cond = threading.Condition()
        self.inbox = {rank: queue.Queue() for rank in range(1, world_size)}
        self.sent: list[int] = []  # bytes of each broadcast

    def join(self, rank: int, world_size: int) -> None:
        with self.cond:
            if world_size != self.world_size:
                raise RuntimeError(f"rank {rank} joins with world_size {world_size}, the group has {self.world_size}")
            if not 0 <= rank < world_size or rank in self.joined:
                raise RuntimeError(f"rank {rank} is out of range or taken (joined: {sorted(self.joined)})")
            self.joined.add(rank)
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: len(self.joined) == self.world_size, timeout=self.timeout_s):
                raise RuntimeError(f"rendezvous timed out: ranks {sorted(self.joined)} of {self.world_size}")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        assert src == 0 and tensor.dtype == torch.uint8
        self.sent.append(tensor.numel())
        for inbox in self.inbox.values():
            inbox.put(tensor.clone())

    def receive(self, rank: int, nbytes: int) -> torch.Tensor:
        tensor = self.inbox[rank].get(timeout=self.timeout_s)
        if tensor.numel() != nbytes:
            raise RuntimeError(f"rank {rank} expected a {nbytes} B buffer, got {tensor.numel()} B "
                               "(NCCL would hang or load garbage)")
        return tensor


class FakeNcclTransport:
    """Learner rank 0's data plane."""

    def __init__(self, wire: FakeNcclWire):
        self.wire = wire
        self.opened: list = []
        self.synchronized = 0

    def open_sender(self, init_info):
        self.opened.append(init_info)
        return self.wire.join(init_info.master_address, init_info.master_port, init_info.rank, init_info.world_size)

    def broadcast(self, group, pairs, buffer_bytes: int, num_buffers: int) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

        iterator = iter(pairs)
        while (chunk := pack_tensors(iterator, lambda item: item[1], buffer_bytes)) is not None:
            self.wire.log("learner", "send")
            group.broadcast(chunk.packed_tensor, src=0)

    def synchronize(self) -> None:
        self.synchronized += 1


class FakeNcclEngine:
    """One engine actor (a vLLM instance) whose workers speak the weight-transfer protocol."""

    def __init__(self, name: str, wire: FakeNcclWire, workers: int = 1, stall: str | None = None,
                 fail: str | None = None):
        self.name, self.wire, self.workers = name, wire, workers
        self.stall, self.fail = stall, fail
        self.release = threading.Event()  # set it to let a stalled call go on
        self.actor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.init_infos: list = []
        self.ranks: list[int] = []
        self.groups: list = []
        self.active = False
        self.staged: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = [{} for _ in range(workers)]  # per worker, after finish

    def submit(self, method: str, args: tuple) -> cf.Future:
        return self.actor.submit(self.collective_rpc, method, args)

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.wire.log(self.name, method)
        if method == self.stall:
            self.release.wait()
        if method == self.fail:
            raise RuntimeError(f"{self.name}: injected failure in {method}")
        result = getattr(self, method)(*args)
        self.wire.log(self.name, f"{method} done")
        return result

    def check_health(self) -> list:
        return [None] * self.workers

    def init_weight_transfer_engine(self, init_info: dict) -> list:
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

        info = NCCLWeightTransferInitInfo(**init_info)  # what the worker's parse_init_info builds
        self.init_infos.append(info)
        # nccl_common.worker_init_process_group, data-parallel size 1: rank = worker + rank_offset.
        self.ranks = [worker + info.rank_offset for worker in range(self.workers)]
        with cf.ThreadPoolExecutor(self.workers) as pool:  # workers join concurrently
            self.groups = list(pool.map(lambda rank: self.wire.join(info.master_address, info.master_port, rank,
                                                                    info.world_size), self.ranks))
        return [None] * self.workers

    def start_weight_update(self) -> list:
        if self.active:
            raise RuntimeError("start_weight_update called while a weight update is already active")
        self.active = True
        self.staged = [{} for _ in range(self.workers)]
        return [None] * self.workers

    def update_weights(self, update_info: dict) -> list:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
        from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

        if not self.active:
            raise RuntimeError("start_weight_update must be called before update_weights")
        info = NCCLWeightTransferUpdateInfo(**update_info)
        init = self.init_infos[-1]
        assert init.packed, "dynalign sends packed buffers"
        meta = [(name, shape, getattr(torch, dtype)) for name, dtype, shape in
                zip(info.names, info.dtype_names, info.shapes)]
        for worker, rank in enumerate(self.ranks):
            # packed_nccl_broadcast_consumer: close a buffer once it holds more than buffer_size_bytes.
            pending, size = [], 0
            for index, (name, shape, dtype) in enumerate(meta):
                pending.append((name, shape, dtype, math.prod(shape) * dtype.itemsize))
                size += pending[-1][3]
                if size > init.packed_buffer_size_bytes or index == len(meta) - 1:
                    packed = self.groups[worker].receive(rank, size)
                    self.wire.log(self.name, "receive")
                    names, shapes, dtypes, sizes = zip(*pending)
                    for key, tensor in unpack_tensor(packed, list(names), list(shapes), list(dtypes), list(sizes)):
                        self.staged[worker][key] = tensor.clone()
                    pending, size = [], 0
        return [None] * self.workers

    def finish_weight_update(self) -> list:
        if not self.active:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update")
        self.active = False
        self.weights = self.staged
        return [None] * self.workers

    def shutdown(self) -> None:
        self.release.set()
        self.actor.shutdown(wait=False, cancel_futures=True)


def fake_submit(engine: FakeNcclEngine, method: str, args: tuple) -> cf.Future:
    return engine.submit(method, args)


class InProcessLearner:
    """Runs a PolicyTrainer method on every rank, each in its own thread, like ``LearnerGroup.call``
    (whose Ray Train hosting is not what these tests are about)."""

    def __init__(self, trainers: list):
        self.trainers = trainers
        self.calls: list[str] = []

    def call(self, name: str, *args, timeout_s: float | None = None) -> list:
        self.calls.append(name)
        started = time.perf_counter()
        pool = cf.ThreadPoolExecutor(len(self.trainers))
        futures = [pool.submit(getattr(trainer, name), *args) for trainer in self.trainers]
        pool.shutdown(wait=False)
        return [future.result(timeout=None if timeout_s is None
                              else max(0.0, timeout_s - (time.perf_counter() - started)))
                for future in futures]
