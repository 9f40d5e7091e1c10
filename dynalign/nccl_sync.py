"""GPU weight sync: vLLM's native NCCL weight transfer, behind the same ``sync()`` contract as ``reload``.

One NCCL group spans learner rank 0 (NCCL rank 0, the only sender) and every worker of every
engine (a vLLM instance with tensor/pipeline parallel size ``n`` has ``n`` workers). Engine ``i``
gets ``rank_offset = 1 + (workers of engines 0..i-1)``; vLLM puts its worker ``w`` at
``w + rank_offset`` (``nccl_common.worker_init_process_group``, data-parallel size 1).

Setup, once, on the first ``sync``:
  1. engines: ``check_health`` on every worker -> how many workers each engine has;
  2. learner rank 0: picks the rendezvous address and a free port on its own node (it hosts the
     TCPStore of vLLM's ``StatelessProcessGroup``);
  3. at the same time (the rendezvous blocks until every rank has joined): every engine's workers
     run vLLM's ``init_weight_transfer_engine`` with their rank offset, and every learner rank runs
     ``nccl_init`` (rank 0 opens the NCCL endpoint; all ranks record the parameter metadata).

Each sync, the four-phase protocol of vLLM's ``NCCLTrainerWeightTransferEngine.send_weights``,
driven from here because the engines are separate vLLM instances owned by Ray actors:
  1. ``start_weight_update`` on every engine (vLLM starts a layerwise reload);
  2. ``update_weights`` on every engine, concurrently with ``nccl_send`` on every learner rank:
     all ranks walk ``PolicyTrainer.weight_buckets`` (the ZeRO-3 gathers are collective), rank 0
     broadcasts the tensors in vLLM's packed buffers (``packed_nccl_broadcast_producer``; the
     workers cut the same buffers from the metadata, ``packed_nccl_broadcast_consumer``);
  3. ``finish_weight_update`` on every engine.
Every phase waits with the sync's deadline and names whoever did not finish (or failed). After a
failure the NCCL group is in an unknown state, so later syncs refuse to run.

vLLM's own ``NCCLTrainerWeightTransferEngine`` is not used on the trainer side: it tells every
worker ``rank_offset=1`` (right for one vLLM instance, with data parallel; wrong for several
independent engines, whose workers would all claim the same ranks) and drives the inference side
from the trainer process; here the Ray driver does, with timeouts. The trainer side uses the same
public pieces that engine is built from: ``NCCLTrainerInitInfo``, ``nccl_common.trainer_init``,
``packed_nccl_broadcast_producer``; the worker side is vLLM's, unmodified.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynalign.config import TrainConfig
from dynalign.sync_backend import WeightSyncError, choose_backend

# Receive buffers per worker (vLLM's DEFAULT_PACKED_NUM_BUFFERS): double buffering.
PACKED_NUM_BUFFERS = 2

Submit = Callable[[Any, str, tuple], cf.Future]


def engine_kwargs(config: TrainConfig) -> dict:
    """Extra ``vllm.LLM(...)`` kwargs: the weight-transfer backend when the sync is NCCL, else none.

    The worker then builds vLLM's ``NCCLWeightTransferEngine`` when it loads the model; the
    rendezvous and the packing parameters arrive later, from the trainer, at the init handshake.
    """
    return {"weight_transfer_config": {"backend": "nccl"}} if choose_backend(config) == "nccl" else {}


# ---------------------------------------------------------------------------------------------
# Arithmetic shared by the driver and the tests
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupLayout:
    """Ranks of the transfer group: 0 is learner rank 0, then each engine's workers in turn."""

    world_size: int
    rank_offsets: tuple[int, ...]


def group_layout(workers_per_engine: list[int]) -> GroupLayout:
    if not workers_per_engine or any(n < 1 for n in workers_per_engine):
        raise WeightSyncError(f"every engine needs at least one worker; got {workers_per_engine}")
    offsets, next_rank = [], 1
    for workers in workers_per_engine:
        offsets.append(next_rank)
        next_rank += workers
    return GroupLayout(world_size=next_rank, rank_offsets=tuple(offsets))


def packed_chunks(tensor_bytes: list[int], buffer_bytes: int) -> list[int]:
    """Bytes of each packed broadcast, by vLLM's rule (``pack_tensors`` on the sender,
    ``packed_nccl_broadcast_consumer`` on the workers): tensors are appended in order and a buffer
    is sent as soon as it holds *more than* ``buffer_bytes``; the rest goes in a last buffer."""
    chunks, current, count = [], 0, 0
    for size in tensor_bytes:
        current += size
        count += 1
        if current > buffer_bytes:
            chunks.append(current)
            current, count = 0, 0
    if count:
        chunks.append(current)
    return chunks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]  # what vLLM's trainer engine sends: torch.bfloat16 -> "bfloat16"


# ---------------------------------------------------------------------------------------------
# Data plane on learner rank 0: the real one (GPU + NCCL); tests swap in a fake
# ---------------------------------------------------------------------------------------------

class VllmNcclTransport:
    """vLLM's NCCL communicator and packed broadcast."""

    def open_sender(self, init_info) -> Any:
        """Join the group as rank 0 (hosts the TCPStore); blocks until every worker has joined."""
        if not torch.cuda.is_available():
            raise RuntimeError("sync.backend = nccl needs a CUDA GPU on learner rank 0; use sync.backend=reload")
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        return trainer_init(init_info, rank=0)

    def broadcast(self, group, pairs: Iterator[tuple[str, torch.Tensor]], buffer_bytes: int,
                  num_buffers: int) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        device = torch.device("cuda", torch.accelerator.current_device_index())

        def on_wire(item: tuple[str, torch.Tensor]) -> torch.Tensor:
            # Learner weights may sit on the CPU (offload); the wire is the GPU. The producer packs
            # on its own streams: keep the memory from being reused before that stream is done.
            tensor = item[1].to(device)
            tensor.record_stream(torch.cuda.current_stream())
            return tensor

        packed_nccl_broadcast_producer(iterator=pairs, group=group, src=0, post_iter_func=on_wire,
                                       buffer_size_bytes=buffer_bytes, num_buffers=num_buffers)

    def synchronize(self) -> None:
        """Called before a gathered bucket is released: the copies out of it must have landed."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()


TRANSPORT: Any = VllmNcclTransport()


# ---------------------------------------------------------------------------------------------
# Learner side: plain functions of a PolicyTrainer (its nccl_* methods call these on every rank)
# ---------------------------------------------------------------------------------------------

def nccl_address(trainer) -> dict | None:
    """Rank 0: where the transfer group meets (this node's address, a free port on it)."""
    if trainer.rank != 0:
        return None
    import ray.util
    from vllm.utils.network_utils import get_open_port

    return {"master_address": os.environ.get("VLLM_HOST_IP") or ray.util.get_node_ip_address(),
            "master_port": get_open_port()}


def param_metadata(trainer) -> tuple[list[str], list[list[int]]]:
    """Names and full shapes in ``weight_buckets`` order (ZeRO-3 keeps the full shape in ds_shape)."""
    names, shapes = [], []
    for name, param in trainer.engine.module.named_parameters():
        names.append(name)
        shapes.append([int(d) for d in getattr(param, "ds_shape", param.shape)])
    return names, shapes


def nccl_init(trainer, info: dict) -> dict | None:
    """Every rank: remember the plan. Rank 0 also opens the NCCL endpoint as rank 0 (blocks until
    every engine worker has joined) and returns the parameter metadata the workers will need."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    init_info = NCCLTrainerInitInfo(**{**info, "rank": trainer.rank})
    names, shapes = param_metadata(trainer)
    state = {"init_info": init_info, "names": names, "shapes": shapes, "group": None}
    if init_info.is_sender:
        device = next(trainer.engine.module.parameters()).device
        if device.type == "cuda":  # the communicator binds to the current device
            torch.cuda.set_device(device)
        state["group"] = TRANSPORT.open_sender(init_info)
    trainer._nccl_state = state
    return {"names": names, "shapes": shapes} if init_info.is_sender else None


def _checked_pairs(buckets, names: list[str], shapes: list[list[int]], dtype: torch.dtype,
                   counts: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every bucket, in order, checked against the metadata the workers were given:
    a disagreement would split the packed stream differently on the two sides (NCCL hangs or
    garbage loads), so it fails here with the parameter's name instead (as vLLM's trainer does)."""
    index = 0
    for bucket in buckets:
        for name, tensor in bucket.items():
            if index >= len(names):
                raise ValueError(f"learner yields more parameters than announced ({len(names)}); first extra: {name}")
            if name != names[index] or list(tensor.shape) != shapes[index] or tensor.dtype != dtype:
                raise ValueError(f"parameter {index} is {name} {list(tensor.shape)} {tensor.dtype}, but the engines "
                                 f"expect {names[index]} {shapes[index]} {dtype}; restart the weight sync")
            counts["bytes"] += tensor.numel() * tensor.element_size()
            index += 1
            yield name, tensor
        counts["gather_buckets"] += 1
        TRANSPORT.synchronize()  # before the next step of weight_buckets releases this gather
    if index != len(names):
        raise ValueError(f"learner yielded {index} parameters, the engines wait for {len(names)}")
    counts["tensors"] = index


def nccl_send(trainer, bucket_bytes: int, dtype_name: str) -> dict | None:
    """Every rank walks the gathered buckets (ZeRO-3 gathers are collective); rank 0 broadcasts.

    ``bucket_bytes`` bounds the gather buckets; the packed NCCL buffers were fixed at ``nccl_init``.
    Returns rank 0's bytes, tensor and bucket counts and seconds; other ranks return None.
    """
    state = getattr(trainer, "_nccl_state", None)
    if state is None:
        raise RuntimeError("nccl_send before nccl_init")
    dtype = getattr(torch, dtype_name)
    buckets = trainer.weight_buckets(bucket_bytes, dtype)
    if state["group"] is None:
        for _ in buckets:
            pass
        return None
    started = time.perf_counter()
    counts = {"bytes": 0, "tensors": 0, "gather_buckets": 0}
    init_info = state["init_info"]
    TRANSPORT.broadcast(state["group"], _checked_pairs(buckets, state["names"], state["shapes"], dtype, counts),
                        init_info.packed_buffer_size_bytes, init_info.packed_num_buffers)
    return {**counts, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------

def ray_submit(engine, method: str, args: tuple) -> cf.Future:
    """Run a vLLM worker method on every worker of one engine actor (``EngineWorker.collective_rpc``)."""
    return engine.collective_rpc.remote(method, args).future()


class NcclWeightSync:
    """``sync(learner, version)`` over NCCL; ``learner`` is a ``LearnerGroup`` (its ``call`` runs a
    PolicyTrainer method on every rank). ``submit`` sends a worker method to one engine and returns
    a future (default: the Ray actor's ``collective_rpc``)."""

    def __init__(self, config: TrainConfig, engines: list, engine_names: list[str], submit: Submit | None = None,
                 after_sync: Callable[[int], None] | None = None):
        """``after_sync(version)`` runs after each transfer (WeightSync: record the version on the engines)."""
        self.config, self.after_sync = config, after_sync
        self.engines, self.engine_names = list(engines), list(engine_names)
        self.submit = submit or ray_submit
        self.timeout_s = config.sync.timeout_s
        self.buffer_bytes = max(1, int(config.sync.bucket_mb * 2**20))
        self.layout: GroupLayout | None = None
        self.update_info: dict | None = None
        self.payload_bytes = 0
        self.chunks = 0
        self.failure: str | None = None
        # learner.call blocks; it runs here while the driver waits on the engines.
        self._learner_thread = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nccl-sync-learner")

    # -- the contract ---------------------------------------------------------------------------
    def sync(self, learner, version: int) -> dict[str, float]:
        if self.failure is not None:
            raise WeightSyncError(f"NCCL weight sync is unusable after an earlier failure ({self.failure}); "
                                  "restart the run")
        try:
            setup_seconds = 0.0
            if self.update_info is None:
                _vllm_nccl()  # import first: vLLM's import time is not the engines' to wait for
                started = time.perf_counter()
                self._setup(learner, started + self.timeout_s)
                setup_seconds = time.perf_counter() - started
            started = time.perf_counter()
            sent = self._transfer(learner, started + self.timeout_s)
            seconds = time.perf_counter() - started
        except Exception as err:
            self.failure = str(err).splitlines()[0]
            if isinstance(err, WeightSyncError):
                raise
            raise WeightSyncError(f"NCCL weight sync failed: {err}") from err
        if self.after_sync is not None:
            self.after_sync(version)
        # Every worker receives the whole payload (tensor-parallel workers too).
        moved = sent["bytes"] * (self.layout.world_size - 1)
        return {"sync_seconds": seconds, "sync_setup_seconds": setup_seconds, "sync_send_seconds": sent["seconds"],
                "sync_bytes": float(moved), "sync_payload_bytes": float(sent["bytes"]),
                "sync_buckets": float(self.chunks), "sync_gb_per_s": moved / max(seconds, 1e-9) / 1e9}

    def restore(self, engine, name: str) -> None:
        """An engine that Ray restarted. Before the group exists it already has the right (initial)
        weights; after, its workers' ranks are gone from the NCCL group, which cannot be rebuilt
        around them yet: fail loudly rather than let it sample from the initial weights."""
        if self.update_info is None:
            return
        self.failure = f"{name} restarted"
        raise WeightSyncError(f"{name} restarted after the NCCL transfer group was formed; rebuilding the group is "
                              "not supported: use sync.backend=reload for runs that restart engines")

    # -- setup ----------------------------------------------------------------------------------
    def _setup(self, learner, deadline: float) -> None:
        NCCLTrainerInitInfo, NCCLWeightTransferInitInfo, worker_init_payload = _vllm_nccl()
        health = self._wait("check_health", self._on_engines("check_health"), deadline)
        self.layout = layout = group_layout([len(workers) for workers in health])
        address = self._wait("nccl_address", {self._on_learner(learner, deadline, "nccl_address"): "learner"},
                             deadline)[0][0]
        wire = {"packed": True, "packed_buffer_size_bytes": self.buffer_bytes, "packed_num_buffers": PACKED_NUM_BUFFERS}
        # vLLM's dataclasses check the field names; rank is set on each learner rank.
        trainer_info = asdict(NCCLTrainerInitInfo(**address, world_size=layout.world_size, rank=0, **wire))
        trainer_info.pop("rank")
        pending = {}
        for engine, name, offset in zip(self.engines, self.engine_names, layout.rank_offsets):
            payload = worker_init_payload(NCCLWeightTransferInitInfo(
                **address, rank_offset=offset, world_size=layout.world_size, **wire))
            pending[self.submit(engine, "init_weight_transfer_engine", (payload,))] = name
        pending[self._on_learner(learner, deadline, "nccl_init", trainer_info)] = "learner"
        results = self._wait("init_weight_transfer_engine", pending, deadline)
        meta = results[-1][0]
        dtype = getattr(torch, self.config.engine_dtype)
        self.update_info = {"names": meta["names"], "dtype_names": [_dtype_name(dtype)] * len(meta["names"]),
                            "shapes": meta["shapes"]}
        sizes = [dtype.itemsize * _numel(shape) for shape in meta["shapes"]]
        self.payload_bytes = sum(sizes)
        self.chunks = len(packed_chunks(sizes, self.buffer_bytes))

    # -- one transfer ---------------------------------------------------------------------------
    def _transfer(self, learner, deadline: float) -> dict:
        self._wait("start_weight_update", self._on_engines("start_weight_update"), deadline)
        # The workers receive inside update_weights: it must run while rank 0 broadcasts.
        pending = self._on_engines("update_weights", self.update_info)
        pending[self._on_learner(learner, deadline, "nccl_send", self.buffer_bytes, self.config.engine_dtype)] = "learner"
        sent = self._wait("update_weights", pending, deadline)[-1][0]
        self._wait("finish_weight_update", self._on_engines("finish_weight_update"), deadline)
        if sent["bytes"] != self.payload_bytes:
            raise WeightSyncError(f"learner sent {sent['bytes']} B, the engines expected {self.payload_bytes} B")
        return sent

    # -- plumbing -------------------------------------------------------------------------------
    def _on_engines(self, method: str, *args) -> dict[cf.Future, str]:
        return {self.submit(engine, method, args): name for engine, name in zip(self.engines, self.engine_names)}

    def _on_learner(self, learner, deadline: float, method: str, *args) -> cf.Future:
        # The learner's own timeout frees this thread if the sync is abandoned.
        timeout = max(deadline - time.perf_counter(), 0.0) + 5.0
        return self._learner_thread.submit(learner.call, method, *args, timeout_s=timeout)

    def _wait(self, phase: str, pending: dict[cf.Future, str], deadline: float) -> list:
        """Results in ``pending``'s order; the first failure, or a timeout, names who."""
        remaining = set(pending)
        while remaining:
            done, remaining = cf.wait(remaining, timeout=max(0.0, deadline - time.perf_counter()),
                                      return_when=cf.FIRST_EXCEPTION)
            for future in done:
                if (error := future.exception()) is not None:  # the whole traceback stays in __cause__
                    raise WeightSyncError(f"weight sync failed in {phase}: {pending[future]}: {_last_line(error)}") \
                        from error
            if remaining and time.perf_counter() >= deadline:
                names = ", ".join(sorted({pending[f] for f in remaining}, key=list(pending.values()).index))
                raise WeightSyncError(f"weight sync stalled in {phase}: {names} did not finish within "
                                      f"sync.timeout_s = {self.timeout_s:g} s")
        return [future.result() for future in pending]


def _last_line(error: BaseException) -> str:
    """A Ray error's text is the remote traceback; its last line says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _vllm_nccl():
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_payload,
    )
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo, NCCLWeightTransferInitInfo, worker_init_payload


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
