"""Actor failures on the real stack: a rollout engine's process is SIGKILLed mid-iteration; Ray
restarts it, the driver restores the current weights and retries its share: no group lost, none
counted twice, and the restarted engine samples from the current policy."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
import ray

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_rollout_actor_killed_mid_iteration(ray_local, tiny_model_path, tmp_path, capfd):
    from dynalign.data import load_prompts
    from dynalign.driver import System, absolute_paths, to_samples

    config = absolute_paths(tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "learner.lr=1e-2",
                                        "rollout.num_workers=2", "data.prompts_per_iteration=4",
                                        "rollout.group_size=4"))
    prompts = load_prompts(config)
    system = System.start(config, tmp_path / "run")
    try:
        groups = system.rollout.generate(prompts.take(4), iteration=0)
        for group in groups:
            group.rewards = [float(j % 2) for j in range(len(group.candidates))]
        system.learner.train_step(to_samples(groups, config)[0])
        system.weight_sync.sync(system.learner, version=1)

        victim = system.rollout.workers[1]
        victim_pid = ray.get(victim.info.remote())["pid"]
        os.kill(victim_pid, signal.SIGKILL)

        wanted = prompts.take(8)
        regenerated = system.rollout.generate(wanted, iteration=1)
        assert "rollout-1 died during 'generate_groups'" in capfd.readouterr().err
        assert [g.prompt_id for g in regenerated] == [p for p, _ in wanted]  # each once, in order
        assert not [p for p, n in Counter(g.prompt_id for g in regenerated).items() if n > 1]

        info = ray.get(victim.info.remote())
        assert info["pid"] != victim_pid and info["weight_version"] == 1
        # The restarted engine samples from the synced policy, not the initial weights.
        samples, _ = to_samples(_zero_rewards(regenerated[4:]), config)
        learner_logprobs = system.learner.logprobs(samples)
        gap = max(abs(e - ours) for s, lp in zip(samples, learner_logprobs, strict=True)
                  for e, ours in zip(s.engine_logprobs, lp, strict=True))
        print(f"restarted engine vs learner max log-prob gap: {gap:.4f}")
        assert gap < 0.05
    finally:
        system.shutdown()


def _zero_rewards(groups):
    for group in groups:
        group.rewards = [0.0] * len(group.candidates)
    return groups
