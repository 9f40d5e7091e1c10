"""ZeRO-3 over three real DeepSpeed ranks (gloo, one process each): weights leave the learner
through ``dynalign.buckets.gather_partitioned`` (each rank casts its partition, rank 0 receives
the partitions into the bucket) with exactly the values DeepSpeed's own gather gives, padding
included (three ranks do not divide the tiny model's 128-wide norms), in fp32 and bf16, and a
saved policy loads in transformers with them."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.conftest import tiny_config

RANKS = 3


def _rank(rank: int, model_path: str, run_dir: str, port: int) -> None:
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dynalign.learner import PolicyTrainer
    from tests.test_learner_step import _samples

    torch.set_num_threads(1)
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(RANKS),
                       "LOCAL_WORLD_SIZE": str(RANKS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        config = tiny_config(model_path, run_dir, f"learner.num_ranks={RANKS}", "learner.zero_stage=3",
                             "learner.lr=5e-2", "learner.micro_batch_size=2", "data.prompts_per_iteration=3",
                             "rollout.group_size=2", "sync.bucket_mb=0.05")
        trainer = PolicyTrainer(config, rank=rank, world_size=RANKS)
        module = trainer.engine.module
        assert all(p.numel() == 0 or p.ds_persist for p in module.parameters())  # partitioned
        trainer.train_step(_samples(trainer.tokenizer, 6))  # the partitions now differ from the files
        padded = [n for n, p in module.named_parameters() if p.ds_numel % RANKS]
        assert padded, "no parameter needs padding: the test would not cover it"

        got = {dtype: [bucket for bucket in trainer.weight_buckets(2**16, dtype, device="cpu")]
               for dtype in (torch.float32, torch.bfloat16)}
        expected = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                expected[name] = param.detach().clone()
        saved = trainer.save_policy(os.path.join(run_dir, "policy"), "bfloat16")
        if rank != 0:
            assert all(bucket == {} for buckets in got.values() for bucket in buckets) and saved is None
            return
        for dtype, buckets in got.items():
            assert len(buckets) > 1  # several buckets, one gather each
            flat = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
            assert list(flat) == list(expected)
            for name, tensor in flat.items():
                assert tensor.dtype == dtype and torch.equal(tensor, expected[name].to(dtype)), name
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
        for name, param in reloaded.named_parameters():
            assert torch.equal(param, expected[name].to(torch.bfloat16)), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_export_gathers_cast_partitions_into_the_bucket(tiny_model_path, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(tiny_model_path, str(tmp_path / "run"), port), nprocs=RANKS)
