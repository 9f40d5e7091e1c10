"""One learner rank's GRPO step on real DeepSpeed (ZeRO-2, gloo, world size 1) in this process:
the paths the driver's usual one-update, beta = 0 runs do not take."""

from __future__ import annotations

import dataclasses
import math
import random
import socket

import pytest
import torch

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group, set up the way Ray Train sets up each rank's (LOCAL_RANK and all)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def _samples(tokenizer, count: int) -> list:
    from dynalign.batch import Sample

    rng = random.Random(0)
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "Name a shared goal."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False))
    return [Sample(prompt_token_ids=prompt, completion_token_ids=[rng.randrange(3, 300) for _ in range(n)],
                   engine_logprobs=[-5.0] * n, advantage=(-1.0) ** i)
            for i, n in enumerate(rng.choice([3, 9, 16]) for _ in range(count))]


@pytest.mark.slow
def test_several_updates_with_a_reference_model(process_group, tiny_model_path, tmp_path):
    """updates_per_iteration = 2 and beta > 0: the second mini-batch's behaviour log-probs come
    from the weights before the first update (its ratio moves off 1), the reference model's KL is
    0 before any update and positive after it; non-finite inputs skip the step, a non-finite
    forward pass is reported (the driver then stops the run in one line)."""
    from dynalign.learner import PolicyTrainer

    config = tiny_config(tiny_model_path, tmp_path / "run", "learner.num_ranks=1", "learner.updates_per_iteration=2",
                         "learner.beta=0.1", "learner.lr=5e-2", "learner.micro_batch_size=2",
                         "data.prompts_per_iteration=4", "rollout.group_size=2")
    trainer = PolicyTrainer(config, rank=0, world_size=1)
    samples = _samples(trainer.tokenizer, 8)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    first = trainer.train_step(samples[:4] + samples[:4])  # the same sequences in both mini-batches
    print({k: round(v, 5) for k, v in first.items()})
    assert first["skipped_nonfinite"] == first["nonfinite_forward"] == first["nonfinite_weights"] == 0.0
    assert first["first_microstep_ratio_max_dev"] < 1e-6
    # Mini-batch 2 repeats mini-batch 1 after one update: ratios off 1, KL to the reference > 0.
    assert first["ratio_max"] > 1.0 + 1e-4 and first["kl_ref"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
    assert first["tokens"] == sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples[:4]) * 2
    assert 0.0 <= first["pad_fraction"] < 1.0 and math.isfinite(first["loss"])

    weights = [p.detach().clone() for p in trainer.engine.module.parameters()]
    poisoned = [dataclasses.replace(s, engine_logprobs=[float("nan")] * len(s.completion_token_ids)) for s in samples]
    assert trainer.train_step(poisoned)["skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.engine.module.parameters()))

    # Finite inputs, a forward pass that overflows (NaN weights): reported before any backward,
    # by the behaviour log-prob pass here, by the training forward with one update.
    with torch.no_grad():
        trainer.engine.module.get_input_embeddings().weight.fill_(float("nan"))
    broken = trainer.train_step(samples)
    assert broken["nonfinite_forward"] == 1.0 and broken["skipped_nonfinite"] == 0.0
    trainer.config.learner.updates_per_iteration = 1  # the same micro-batches per update (4 samples, 2 x 2)
    broken = trainer.train_step(samples[:4])
    assert broken["nonfinite_forward"] == 1.0 and broken["skipped_nonfinite"] == 0.0
