"""The Dynamic Alignment loop on the real stack: Ray actors with vLLM (CPU), DeepSpeed ranks under
Ray Train, in-place weight sync. Slow: each test starts engines and learner ranks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _max_logprob_gap(learner, samples) -> float:
    learner_logprobs = learner.logprobs(samples)
    return max(abs(engine - ours)
               for sample, per_token in zip(samples, learner_logprobs, strict=True)
               for engine, ours in zip(sample.engine_logprobs, per_token, strict=True))


def test_sync_makes_engine_logprobs_match_learner(ray_local, tiny_model_path, tmp_path):
    """After a sync vLLM's sampling log-probs match the learner's within 0.05; without it they do not."""
    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths, to_samples
    from dynalign.learner import LearnerError, LearnerGroup
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync, WeightSyncError

    config = absolute_paths(tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "learner.lr=1e-2",
                                        "data.prompts_per_iteration=4", "rollout.group_size=4", "sync.bucket_mb=0.1"))
    prompts = load_prompts(config)
    rollout = RolloutPool(config)
    learner = LearnerGroup(config, tmp_path / "train")
    sync = WeightSync(config, rollout.workers, ["rollout-0"])
    try:
        groups = rollout.generate(prompts.take(4), iteration=0)
        for group in groups:  # alternate signs: a real, non-zero update regardless of any reward
            group.rewards = [float(j % 2) for j in range(len(group.candidates))]
        samples, _ = to_samples(groups, config)
        initial_gap = _max_logprob_gap(learner, samples)
        metrics = learner.train_step(samples)
        assert metrics["first_microstep_ratio_max_dev"] < 1e-6

        checksum_before = rollout.workers[0].weight_checksum.remote()
        stale_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=1)), config)
        stale_gap = _max_logprob_gap(learner, stale_samples)

        stats = sync.sync(learner, version=1)
        checksum_after = rollout.workers[0].weight_checksum.remote()
        fresh_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=2)), config)
        fresh_gap = _max_logprob_gap(learner, fresh_samples)
        print(f"max |engine - learner| log-prob: initial {initial_gap:.4f}, stale {stale_gap:.4f}, "
              f"after sync {fresh_gap:.4f}; sync {stats['sync_seconds']:.3f} s, {stats['sync_bytes']:.0f} B")
        assert initial_gap < 0.05
        assert fresh_gap < 0.05
        assert stale_gap > 0.05, "without a sync the engine should still sample from the old weights"
        import ray
        assert ray.get(checksum_before) != ray.get(checksum_after)
        assert stats["sync_bytes"] > 0
        assert stats["sync_buckets"] > 1  # 0.1 MiB buckets for a ~0.75 MB model

        # A sync that cannot finish in time fails with the engine's name instead of hanging.
        config.sync.timeout_s = 1e-4
        with pytest.raises(WeightSyncError, match=r"rollout-0 did not finish within sync.timeout_s"):
            WeightSync(config, rollout.workers, ["rollout-0"]).sync(learner, version=2)

        # A NaN loss skips the step on every rank (weights untouched); K in a row stop the run.
        poisoned = [dataclasses.replace(s, advantage=float("nan")) for s in fresh_samples]
        before = learner.logprobs(fresh_samples)
        for _ in range(config.learner.max_nonfinite_steps - 1):
            assert learner.train_step(poisoned)["skipped_nonfinite"] == 1.0
        assert learner.logprobs(fresh_samples) == before
        with pytest.raises(LearnerError, match=r"NaN or infinite in 3 steps in a row \(learner.max_nonfinite_steps = 3\)"):
            learner.train_step(poisoned)
    finally:
        learner.shutdown()
        rollout.shutdown()


def _with_zero_rewards(groups):
    for group in groups:
        group.rewards = [0.0] * len(group.candidates)
    return groups


def test_rule_reward_learning_doubles(ray_local, tiny_model_path, tmp_path):
    """GRPO learns: with a rule reward and fixed seeds, the last two iterations' mean reward is at
    least double the first iteration's. Also: ratio 1 on each iteration's first micro-step."""
    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    config = tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "iterations=8", "learner.lr=5e-3",
                         "rollout.group_size=8", "data.prompts_per_iteration=8")
    summary = train(config)
    metrics = read_metrics(config.run_dir)
    rewards = [m["reward_mean"] for m in metrics]
    first, last_two = rewards[0], sum(rewards[-2:]) / 2
    print(f"rule reward: first iteration {first:.4f}, mean of last two {last_two:.4f} (all: "
          f"{', '.join(f'{r:.4f}' for r in rewards)})")
    assert len(metrics) == 8
    assert last_two >= 2 * first > 0
    for m in metrics:
        assert m["learner.first_microstep_ratio_max_dev"] < 1e-6
        assert m["learner.engine_gap_max_abs"] < 0.05  # every sync landed
        assert m["sync_bytes"] > 0
    assert summary["reward_mean_per_iteration"] == rewards
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_self_rewarding_smoke_through_cli(ray_local, tiny_model_path, tmp_path, capsys):
    """The smoke job, as `dynalign train` runs it: the policy judges itself (logprob mode), two
    iterations, the final policy saved in Hugging Face format."""
    from transformers import AutoModelForCausalLM

    from dynalign.cli import main

    run_dir = tmp_path / "smoke"
    config = tiny_config(tiny_model_path, run_dir)
    overrides = [f"model.path={config.model.path}", f"run_dir={run_dir}", f"data.prompts_path={config.data.prompts_path}",
                 f"judge.value_spec={config.judge.value_spec}", "logging.progress=false"]
    from tests.conftest import REPO
    assert main(["train", "--config", str(REPO / "configs/smoke.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "dynalign run summary" in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    for m in metrics:
        assert 0.0 <= m["reward_min"] <= m["reward_max"] <= 5.0
        assert m["judge.invalid_share"] == 0.0  # logprob scoring never fails to parse
        for phase in ("generate", "judge", "learn", "sync"):
            assert m[f"time.{phase}"] > 0
    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert model.config.vocab_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 2


def test_all_groups_tied_warns_and_the_update_is_a_no_op(ray_local, tiny_model_path, tmp_path, capfd):
    """Every group's rewards tie (one-token answers under the length rule all score 1): the driver
    drops and refills them for max_refill_rounds, then warns in one line, logs tied_group_share = 1
    and trains on zero advantages (no gradient), and the run goes on to the next iteration."""
    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    config = tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "judge.rule=length",
                         "rollout.max_new_tokens=1", "iterations=2", "learner.max_refill_rounds=1",
                         "data.prompts_per_iteration=4", "rollout.group_size=4", "logging.tensorboard=false")
    train(config)
    err = capfd.readouterr().err
    for iteration in (0, 1):
        assert (f"dynalign: warning: iteration {iteration}: all 8 groups have zero reward variance after 2 round(s); "
                "no learning signal") in err
    metrics = read_metrics(config.run_dir)
    assert [m["iteration"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["tied_group_share"] == 1.0 and m["generation_rounds"] == 2.0
        assert m["reward_min"] == m["reward_max"] == 1.0
        assert m["learner.grad_norm"] == 0.0  # zero advantages: nothing to learn
        assert m["learner.skipped_nonfinite"] == 0.0
