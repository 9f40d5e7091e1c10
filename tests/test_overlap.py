"""Off-policy overlap (rollout.max_staleness) without Ray: the option, the groups produced ahead
(staleness bound, checkpoint records) and the importance-sampling math for stale samples."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from dynalign import grpo
from dynalign.batch import Candidate, Group
from dynalign.config import ConfigError, load_config
from dynalign.overlap import (
    RolloutsAhead,
    ScoredRollouts,
    group_from_record,
    group_record,
    staleness_stats,
)
from tests.conftest import REPO


def test_max_staleness_option():
    assert load_config(REPO / "configs/smoke.yaml").rollout.max_staleness == 0  # synchronous by default
    assert load_config(REPO / "configs/smoke.yaml", ["rollout.max_staleness=1"]).rollout.max_staleness == 1
    with pytest.raises(ConfigError, match=r"^rollout.max_staleness = -1 .*>= 0"):
        load_config(REPO / "configs/smoke.yaml", ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match=r"rollout.max_staleness = 1 .* rollout.sleep_while_learning .*set "
                                          r"rollout.max_staleness=0 or rollout.sleep_while_learning=false$"):
        load_config(REPO / "configs/gpu_1x.yaml", ["rollout.max_staleness=1"])


def _group(prompt_id: str, version: int, judge_version: int | None = None) -> Group:
    candidates = [Candidate(token_ids=[5, 6], text="ab", logprobs=[-0.1 / 3, -2.0 / 7], finish_reason="stop"),
                  Candidate(token_ids=[7], text="c", logprobs=[-1e-9], finish_reason="length")]
    return Group(prompt_id, f"prompt {prompt_id}", [1, 2, 3], candidates, rewards=[0.1 / 3, float("nan")],
                 judge_info={"score": [0.1 / 3, float("nan")], "values": {(0, 0, None): 1.0}},
                 generation_version=version, judge_version=judge_version)


class Engines:
    """What produce() sees: the engines' weight version, which the driver's sync raises."""

    def __init__(self):
        self.version = 0
        self.calls: list[tuple[int, list | None, str]] = []

    def produce(self, iteration: int, prompts: list[tuple[str, str]] | None) -> ScoredRollouts:
        self.calls.append((iteration, prompts, threading.current_thread().name))
        ids = [p for p, _ in prompts] if prompts else [f"{iteration}-{i}" for i in range(2)]
        return ScoredRollouts(iteration, [_group(i, self.version, self.version) for i in ids],
                              {"reward_mean": float(iteration), "time.generate": 1.0})


def test_one_step_off_trains_on_groups_one_version_old():
    engines = Engines()
    rollouts = RolloutsAhead(engines.produce, max_staleness=1)
    try:
        for iteration in range(3):
            scored = rollouts.get(iteration)                 # the learner holds version `iteration`
            rollouts.start(iteration + 1)                    # produced while it steps ...
            rollouts.finish()
            engines.version = iteration + 1                  # ... then the sync
            assert scored.iteration == iteration and scored.stats["reward_mean"] == iteration
            assert {g.generation_version for g in scored.groups} == {max(iteration - 1, 0)}
            assert scored.stats["staleness.max"] == scored.stats["staleness.mean"] == min(iteration, 1)
            assert scored.stats["staleness.dropped"] == 0 and scored.stats["version.judge_mismatch"] == 0
        # Only iteration 0 is produced on the spot; the others in the background thread.
        assert [c[0] for c in engines.calls] == [0, 1, 2, 3]
        assert engines.calls[0][2] == threading.current_thread().name
        assert all(c[2].startswith("rollouts-ahead") for c in engines.calls[1:])
    finally:
        rollouts.close()


def test_synchronous_loop_never_produces_ahead():
    engines = Engines()
    engines.version = 1
    rollouts = RolloutsAhead(engines.produce, max_staleness=0)
    rollouts.start(1)
    assert engines.calls == [] and rollouts.state() == []
    scored = rollouts.get(1)
    assert scored.stats["staleness.max"] == 0 and len(engines.calls) == 1


def test_groups_staler_than_the_bound_are_dropped_and_their_prompts_generated_again():
    engines = Engines()
    engines.version = 4
    ahead = RolloutsAhead(engines.produce, max_staleness=1)
    ahead.restore([{"group": group_record(_group("a", 3))}, {"group": group_record(_group("b", 3))},
                   {"iteration": 5, "stats": {"prompts.kept": 2.0, "reward_mean": -1.0}}])
    scored = ahead.get(5)  # learner at version 5: groups of version 3 are 2 versions old
    assert engines.calls == [(5, [("a", "prompt a"), ("b", "prompt b")], threading.current_thread().name)]
    assert [g.prompt_id for g in scored.groups] == ["a", "b"] and {g.generation_version for g in scored.groups} == {4}
    assert scored.stats["staleness.dropped"] == 4.0  # 2 groups x 2 candidates
    assert scored.stats["staleness.max"] == 1.0
    assert scored.stats["reward_mean"] == 5.0 and scored.stats["prompts.kept"] == 2.0  # data metrics of what trains

    within = RolloutsAhead(engines.produce, max_staleness=2)
    within.restore([{"group": group_record(_group("a", 3))}, {"iteration": 5, "stats": {}}])
    assert within.get(5).stats["staleness.max"] == 2.0 and len(engines.calls) == 1  # kept, not regenerated


def test_groups_produced_ahead_round_trip_a_checkpoint_exactly():
    engines = Engines()
    engines.version = 7
    rollouts = RolloutsAhead(engines.produce, max_staleness=1)
    try:
        rollouts.start(8)
        rollouts.finish()
        records = json.loads(json.dumps(rollouts.state()))  # as the checkpoint's JSON lines hold them
        restored = RolloutsAhead(engines.produce, max_staleness=1)
        restored.restore(records)
        original, again = rollouts.get(8), restored.get(8)
    finally:
        rollouts.close()
    assert len(engines.calls) == 1  # the restored groups are not produced again
    for a, b in zip(original.groups, again.groups, strict=True):
        assert a.candidates == b.candidates  # log-probs bit for bit
        assert a.rewards[0] == b.rewards[0] and math.isnan(b.rewards[1])
        assert (b.generation_version, b.judge_version) == (7, 7)
        assert list(b.judge_info) == ["score"]  # per-slot values (tuple keys) are not kept
        assert b.judge_info["score"][0] == a.judge_info["score"][0] and math.isnan(b.judge_info["score"][1])
    assert json.dumps(original.stats, sort_keys=True) == json.dumps(again.stats, sort_keys=True)
    assert group_from_record(group_record(original.groups[0])).prompt_token_ids == [1, 2, 3]


def test_judge_versions_in_the_metrics():
    groups = [_group("a", 2, 2), _group("b", 2, 3), _group("c", 1, None)]
    stats = staleness_stats(groups, learner_version=3, dropped=0)
    assert stats["staleness.mean"] == pytest.approx(4 / 3) and stats["staleness.max"] == 2.0
    assert stats["version.judge_min"] == 2.0 and stats["version.judge_mismatch"] == 1.0
    assert "version.judge_min" not in staleness_stats([_group("r", 0)], 0, 0)  # the rule judge has no weights


def _policy_gradient(theta, behaviour_logprobs, reward, cap):
    """Gradient of the learner's loss for one stale batch holding every outcome once, weighted by
    its behaviour probability (an exact expectation over the engine's samples), at the first
    micro-step (old = the current policy's own log-probs, as learner.train_step takes them)."""
    theta = theta.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, dim=0).unsqueeze(1)            # [V outcomes, 1 token]
    old = logprobs.detach()
    engine = behaviour_logprobs.unsqueeze(1)
    advantages = behaviour_logprobs.exp() * reward * len(reward)      # mu(x) R(x), times B for the mean
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    is_weights = grpo.truncated_is_weights(old, engine, cap)
    loss, metrics = grpo.policy_loss(logprobs, old, advantages, mask, grpo.LossNormalizer.from_mask(
        "seq_mean_token_mean", mask, max_len=1), is_weights=is_weights)
    loss.backward()
    return theta.grad, metrics


def test_stale_samples_with_engine_importance_weights_give_the_on_policy_gradient():
    """Samples from stale weights mu, trained on by the current policy pi: the PPO ratio is taken
    against pi's own log-probs (the proximal policy), the truncated IS weight min(pi/mu, cap)
    against the engine's behaviour log-probs. Without a binding cap their product is pi/mu, so
    the expected gradient is the on-policy one, -grad E_pi[R]; without IS it is biased."""
    torch.manual_seed(0)
    theta, stale_theta = torch.randn(6), torch.randn(6)
    reward = torch.rand(6)
    mu = torch.log_softmax(stale_theta, dim=0)
    pi = torch.log_softmax(theta, dim=0)
    exact = torch.func.grad(lambda t: -(torch.softmax(t, dim=0) * reward).sum())(theta)

    with_is, metrics = _policy_gradient(theta, mu, reward, cap=1e6)
    assert torch.allclose(with_is, exact, atol=1e-6)
    assert metrics["is_weight_mean"] == pytest.approx((pi - mu).exp().mean().item(), rel=1e-5)
    without_is, _ = _policy_gradient(theta, mu, reward, cap=None)
    assert not torch.allclose(without_is, exact, atol=1e-3)
    # A binding cap truncates the weights to min(pi/mu, cap): bias for bounded variance.
    capped, _ = _policy_gradient(theta, mu, reward, cap=1.2)
    weights = (pi - mu).exp().clamp(max=1.2)
    expected = torch.func.grad(lambda t: -(torch.log_softmax(t, dim=0) * (mu.exp() * weights * reward)).sum())(theta)
    assert torch.allclose(capped, expected, atol=1e-6)
    # On-policy samples (mu = pi): weights of 1, the same gradient as without IS.
    on_policy, _ = _policy_gradient(theta, pi, reward, cap=2.0)
    assert torch.allclose(on_policy, exact, atol=1e-6)


def test_a_learner_restart_waits_for_the_groups_in_production_and_discards_them(caplog):
    """A learner rank dies while the next groups are in production: ``discard`` waits for them
    (their engines are about to be synced back) and drops them, a failure there included; the
    replayed iteration's groups are then produced again, on the spot."""
    engines = Engines()
    release = threading.Event()

    def slow_produce(iteration, prompts):
        assert release.wait(30)
        if iteration == 2:
            raise RuntimeError("engine died")
        return engines.produce(iteration, prompts)

    rollouts = RolloutsAhead(slow_produce, max_staleness=1)
    try:
        for failing in (False, True):
            rollouts.start(2 if failing else 1)
            discarding = threading.Thread(target=rollouts.discard)
            discarding.start()
            discarding.join(0.3)
            assert discarding.is_alive()  # still waiting for the groups in production
            release.set()
            discarding.join(30)
            assert not discarding.is_alive() and rollouts.state() == []
            release.clear()
        assert "groups produced ahead failed (engine died)" in caplog.text
        release.set()
        calls = len(engines.calls)
        assert rollouts.get(1).iteration == 1 and len(engines.calls) == calls + 1  # produced again
        assert engines.calls[-1][2] == threading.current_thread().name
    finally:
        release.set()
        rollouts.close()
