"""One learner rank's GRPO step on real DeepSpeed (ZeRO-2, gloo, world size 1) in this process:
the paths the driver's usual one-update, beta = 0 runs do not take."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from tests.conftest import tiny_config


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


@pytest.mark.slow
def test_bf16_mixed_precision_step_on_cpu(process_group, tiny_model_path, tmp_path):
    """model.learner_dtype=bfloat16 on the CPU (what `auto` picks on CPUs with AMX): bf16 weights,
    float32 master weights in DeepSpeed's optimizer, and the same step as float32 to bf16 precision."""
    from dynalign.learner import PolicyTrainer

    overrides = ["learner.num_ranks=1", "learner.micro_batch_size=2", "data.prompts_per_iteration=2",
                 "rollout.group_size=2", "learner.lr=1e-3"]
    steps, weights = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(tiny_model_path, tmp_path / dtype, *overrides, f"model.learner_dtype={dtype}")
        trainer = PolicyTrainer(config, rank=0, world_size=1)
        assert {p.dtype for p in trainer.engine.module.parameters()} == {getattr(torch, dtype)}
        samples = _samples(trainer.tokenizer, 4)
        before = [p.detach().float().clone() for p in trainer.engine.module.parameters()]
        steps[dtype] = trainer.train_step(samples)
        weights[dtype] = [p.detach().float() - b for p, b in zip(trainer.engine.module.parameters(), before)]
        if dtype == "bfloat16":  # the update is applied to float32 masters, then cast back
            masters = [p for group in trainer.engine.optimizer.fp32_groups for p in group]  # one rank: ZeRO-0
            assert len(masters) == len(before) and all(m.dtype == torch.float32 for m in masters)
    bf16, fp32 = steps["bfloat16"], steps["float32"]
    assert bf16["skipped_nonfinite"] == bf16["nonfinite_forward"] == bf16["nonfinite_weights"] == 0.0
    assert bf16["first_microstep_ratio_max_dev"] < 1e-6  # old log-probs are the training forward's, in bf16 too
    assert abs(bf16["loss"] - fp32["loss"]) < 0.05 * abs(fp32["loss"]) + 1e-3, (bf16["loss"], fp32["loss"])
    assert abs(bf16["grad_norm"] - fp32["grad_norm"]) < 0.05 * fp32["grad_norm"]
    # Both took the same step: the weight changes point the same way.
    moved_bf16, moved_fp32 = (torch.cat([d.flatten() for d in weights[k]]) for k in ("bfloat16", "float32"))
    assert torch.nn.functional.cosine_similarity(moved_bf16, moved_fp32, dim=0) > 0.9


@pytest.mark.slow
def test_attention_kernel_is_configurable_and_takes_the_same_step(process_group, tiny_model_path, tmp_path):
    """model.attn_implementation picks the learner's attention kernel (the main job runs eager:
    faster on short bf16 sequences on CPU); eager and torch's fused kernel take the same step on
    padded, length-sorted micro-batches."""
    from dynalign.learner import PolicyTrainer

    steps = {}
    for kernel in ("sdpa", "eager"):
        config = tiny_config(tiny_model_path, tmp_path / kernel, "learner.num_ranks=1", "learner.micro_batch_size=2",
                             "data.prompts_per_iteration=2", "rollout.group_size=2", "learner.lr=1e-3",
                             f"model.attn_implementation={kernel}")
        trainer = PolicyTrainer(config, rank=0, world_size=1)
        assert trainer.engine.module.config._attn_implementation == kernel
        steps[kernel] = trainer.train_step(_samples(trainer.tokenizer, 4))
    for key in ("loss", "grad_norm", "entropy"):
        assert abs(steps["eager"][key] - steps["sdpa"][key]) <= 1e-5 * max(1.0, abs(steps["sdpa"][key])), key


@pytest.mark.slow
def test_weights_gone_non_finite_are_reported_though_loss_and_gradient_were_finite(process_group, tiny_model_path,
                                                                                   tmp_path):
    """An update that sends the weights to inf or NaN (here an infinite learning rate) on finite
    loss and gradients: the step reports it (the driver then stops the run in one line)."""
    from dynalign.learner import PolicyTrainer

    config = tiny_config(tiny_model_path, tmp_path / "run", "learner.num_ranks=1", "learner.micro_batch_size=2",
                         "data.prompts_per_iteration=2", "rollout.group_size=2")
    trainer = PolicyTrainer(config, rank=0, world_size=1)
    samples = _samples(trainer.tokenizer, 4)
    assert trainer.train_step(samples)["nonfinite_weights"] == 0.0
    for group in trainer.engine.optimizer.param_groups:
        group["lr"] = float("inf")
    step = trainer.train_step(samples)
    assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
    assert step["nonfinite_weights"] == 1.0


@pytest.mark.slow
def test_zero3_builds_partitioned_and_saves_streaming(process_group, tiny_model_path, tmp_path):
    """ZeRO-3 builds the policy and the reference model already partitioned (every parameter is a
    DeepSpeed shard outside a gather), takes the same first step as ZeRO-0 (same loss, gradient
    norm over two accumulated micro-batches and updated weights: Adam's first step is lr x the
    gradient's sign, so a wrong gradient moves weights by up to 2 lr = 0.1), saves a policy that transformers loads with those weights, one shard
    per bucket, and reports its peak memory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dynalign.learner import PolicyTrainer

    overrides = ("learner.num_ranks=1", "learner.beta=0.1", "learner.lr=5e-2", "learner.micro_batch_size=2",
                 "data.prompts_per_iteration=2", "rollout.group_size=2", "sync.bucket_mb=0.05",
                 "learner.adam_betas=[0.8,0.95]")
    results = {}
    for stage in (0, 3):
        config = tiny_config(tiny_model_path, tmp_path / f"run{stage}", *overrides, f"learner.zero_stage={stage}")
        trainer = PolicyTrainer(config, rank=0, world_size=1)
        partitioned = [hasattr(p, "ds_tensor") and p.numel() == 0
                       for model in (trainer.engine.module, trainer.reference) for p in model.parameters()]
        assert all(partitioned) if stage == 3 else not any(partitioned)
        assert all(tuple(group["betas"]) == (0.8, 0.95) for group in trainer.engine.optimizer.param_groups)
        step = trainer.train_step(_samples(trainer.tokenizer, 4))
        assert step["rss_peak_gib_max"] > 0.1 and step["kl_ref"] == 0.0
        path = trainer.save_policy(str(tmp_path / f"policy{stage}"), "float32")
        results[stage] = (step, path)
    (step0, _), (step3, path3) = results[0], results[3]
    assert step3["loss"] == pytest.approx(step0["loss"], rel=1e-5, abs=1e-7)
    # Two micro-batches accumulate (ZeRO-3 counts micro-steps in engine.forward: called around
    # it, it kept only the last micro-batch's gradient, norm 0.97 against 1.61 here).
    assert step3["grad_norm"] == pytest.approx(step0["grad_norm"], rel=1e-5)
    shards = sorted((tmp_path / "policy3").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "policy3" / "model.safetensors.index.json").is_file()
    saved3 = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    saved0 = {k: v for shard in sorted((tmp_path / "policy0").glob("model-*.safetensors"))
              for k, v in load_file(str(shard)).items()}
    assert set(saved3) == set(saved0)
    for name in saved0:
        torch.testing.assert_close(saved3[name], saved0[name], rtol=0, atol=5e-3)  # 2.7e-4 measured
    reloaded = AutoModelForCausalLM.from_pretrained(path3, dtype=torch.float32)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, saved3[name]), name


def test_learner_benchmarks_plain_engine_runs_the_real_step(tiny_model_path, tmp_path):
    """benchmarks/bench_learner.py times ``PolicyTrainer.train_step`` on a plain-torch stand-in for
    DeepSpeed's engine; the stand-in must keep up with what the step asks of the engine (it once
    broke when the step started asking for the accumulation boundary)."""
    from transformers import AutoTokenizer

    from benchmarks.bench_learner import plain_trainer

    config = tiny_config(tiny_model_path, tmp_path / "run", "learner.num_ranks=1", "learner.micro_batch_size=2",
                         "data.prompts_per_iteration=2", "rollout.group_size=2")
    trainer = plain_trainer(config, AutoTokenizer.from_pretrained(tiny_model_path), tiny_model_path)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    step = trainer.train_step(_samples(trainer.tokenizer, 4))
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0 and step["skipped_nonfinite"] == 0.0
    assert trainer.engine.micro == 2 and any(not torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
