"""Tests of the pure-torch GRPO core: formulas against hand-computed numbers, gradients against
independent derivations, and gradient-accumulation invariance."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dynalign.grpo import (
    LOSS_AGG_MODES,
    LossNormalizer,
    aggregate_loss,
    group_advantages,
    kl_penalty,
    logprob_gap_stats,
    policy_loss,
    token_entropy,
    token_logprobs,
    truncated_is_weights,
    zero_variance_groups,
)

f64 = torch.float64
NAN = float("nan")


def t64(values) -> Tensor:
    return torch.tensor(values, dtype=f64)


# ----------------------------------------------------------------------------------------------
# Advantages

REWARDS = [[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]]
# Group means 3 and 0.5; population variances 14/4 and 1/4.
CENTERED = [[-2.0, -1.0, 0.0, 3.0], [-0.5, -0.5, 0.5, 0.5]]


def test_group_advantages_group_std_hand_computed():
    advantages, valid, _ = group_advantages(t64(REWARDS), "group", eps=0.0)
    expected = t64([[c / math.sqrt(3.5) for c in CENTERED[0]], [-1.0, -1.0, 1.0, 1.0]])
    torch.testing.assert_close(advantages, expected)
    assert valid.all()


def test_group_advantages_eps_is_added_to_std():
    advantages, _, _ = group_advantages(t64(REWARDS), "group", eps=0.5)
    torch.testing.assert_close(advantages[1], t64([-0.5, -0.5, 0.5, 0.5]) / (0.5 + 0.5))


def test_group_advantages_batch_std_hand_computed():
    # Population std of all rewards-minus-group-mean: sqrt((14 + 1) / 8).
    advantages, _, stats = group_advantages(t64(REWARDS), "batch", eps=0.0)
    torch.testing.assert_close(advantages, t64(CENTERED) / math.sqrt(15 / 8))
    assert stats["advantage_std"] == pytest.approx(1.0)


def test_group_advantages_none_only_centres():
    advantages, _, _ = group_advantages(t64(REWARDS), "none")
    torch.testing.assert_close(advantages, t64(CENTERED))


def test_group_advantages_stats_hand_computed():
    _, _, stats = group_advantages(t64(REWARDS), "none")
    flat = [r for group in REWARDS for r in group]
    mean = sum(flat) / 8
    assert stats["reward_mean"] == pytest.approx(mean)
    assert stats["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in flat) / 8))
    assert stats["advantage_mean"] == pytest.approx(0.0)
    assert stats["advantage_std"] == pytest.approx(math.sqrt(15 / 8))
    assert stats["advantage_abs_max"] == pytest.approx(3.0)
    assert stats["zero_variance_group_share"] == 0.0
    assert stats["invalid_share"] == 0.0


@pytest.mark.parametrize("std_norm", ["group", "batch", "none"])
def test_adding_a_constant_to_a_group_leaves_advantages_unchanged(std_norm):
    rewards = t64(REWARDS)
    shifted = rewards.clone()
    shifted[0] += 7.25
    torch.testing.assert_close(
        group_advantages(shifted, std_norm)[0], group_advantages(rewards, std_norm)[0]
    )


def test_scaling_a_group_leaves_group_normalised_advantages_unchanged():
    rewards = t64(REWARDS)
    scaled = rewards.clone()
    scaled[1] *= 3.0
    torch.testing.assert_close(
        group_advantages(scaled, "group", eps=0.0)[0],
        group_advantages(rewards, "group", eps=0.0)[0],
    )


def test_scaling_all_rewards_leaves_batch_normalised_advantages_unchanged():
    rewards = t64(REWARDS)
    torch.testing.assert_close(
        group_advantages(2.5 * rewards, "batch", eps=0.0)[0],
        group_advantages(rewards, "batch", eps=0.0)[0],
    )


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    rewards = t64([[1.0, NAN, 3.0, 5.0], [NAN, NAN, 2.0, NAN], [4.0, 4.0, NAN, 4.0], [NAN] * 4])
    advantages, valid, stats = group_advantages(rewards, "group", eps=0.0)

    expected_valid = ~torch.isnan(rewards)
    assert torch.equal(valid, expected_valid)
    # Group 0: valid [1, 3, 5], mean 3, population std sqrt(8/3); NaN does not shift either.
    std = math.sqrt(8 / 3)
    expected = t64([[-2 / std, 0.0, 0.0, 2 / std], [0.0] * 4, [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(advantages, expected)
    assert not torch.isnan(advantages).any()

    valid_rewards = [1.0, 3.0, 5.0, 2.0, 4.0, 4.0, 4.0]
    mean = sum(valid_rewards) / 7
    assert stats["invalid_share"] == pytest.approx(9 / 16)
    # Group 1 has a single valid reward, group 2 ties, group 3 has none.
    assert stats["zero_variance_group_share"] == pytest.approx(3 / 4)
    assert stats["reward_mean"] == pytest.approx(mean)
    assert stats["reward_std"] == pytest.approx(
        math.sqrt(sum((r - mean) ** 2 for r in valid_rewards) / 7)
    )
    valid_advantages = [-2 / std, 0.0, 2 / std, 0.0, 0.0, 0.0, 0.0]
    assert stats["advantage_mean"] == pytest.approx(0.0)
    assert stats["advantage_std"] == pytest.approx(
        math.sqrt(sum(a**2 for a in valid_advantages) / 7)
    )
    assert stats["advantage_abs_max"] == pytest.approx(2 / std)


@pytest.mark.parametrize("std_norm", ["batch", "none"])
def test_nan_rewards_get_zero_advantage_in_every_mode(std_norm):
    advantages, valid, _ = group_advantages(t64([[1.0, NAN, 3.0], [NAN, 5.0, 9.0]]), std_norm)
    assert advantages[0, 1] == 0.0 and advantages[1, 0] == 0.0
    assert not valid[0, 1] and not valid[1, 0]
    assert not torch.isnan(advantages).any()


def test_zero_variance_groups():
    rewards = t64(
        [
            [1.0, 1.0, 1.0],
            [1.0, 2.0, 1.0],
            [NAN, 3.0, 3.0],
            [NAN, 3.0, 4.0],
            [NAN, NAN, 2.0],
            [NAN] * 3,
        ]
    )
    assert zero_variance_groups(rewards).tolist() == [True, False, True, False, True, True]


def test_group_advantages_rejects_bad_options():
    with pytest.raises(ValueError, match="std_norm must be one of group, batch, none; got 'grp'"):
        group_advantages(t64(REWARDS), "grp")
    with pytest.raises(ValueError, match="group_rewards must be"):
        group_advantages(t64([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------
# KL, importance weights, mismatch stats


def test_kl_estimators_hand_computed():
    logprobs, ref = t64([math.log(0.5), math.log(0.3)]), t64([math.log(0.25), math.log(0.3)])
    log2 = math.log(2.0)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), t64([log2, 0.0]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), t64([0.5 * log2**2, 0.0]))
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + log 2 - 1
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), t64([0.5 + log2 - 1.0, 0.0]))


def test_k3_is_non_negative_and_clamped():
    torch.manual_seed(0)
    logprobs, ref = torch.randn(50, dtype=f64), torch.randn(50, dtype=f64)
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()
    # A log-ratio of -100 would give exp(100); the clamp holds it at exp(20).
    extreme = kl_penalty(t64([-100.0]), t64([0.0]), "k3")
    torch.testing.assert_close(extreme, t64([math.exp(20.0) - 20.0 - 1.0]))
    with pytest.raises(ValueError, match="kl_estimator must be one of k1, k2, k3; got 'k4'"):
        kl_penalty(logprobs, ref, "k4")


def test_truncated_is_weights_hand_computed():
    learner = t64([math.log(0.5), math.log(0.2), math.log(0.9)]).requires_grad_()
    engine = t64([math.log(0.25), math.log(0.4), math.log(0.3)])
    weights = truncated_is_weights(learner, engine, cap=2.5)  # raw ratios 2, 0.5, 3
    torch.testing.assert_close(weights, t64([2.0, 0.5, 2.5]))
    assert not weights.requires_grad
    off = truncated_is_weights(learner, engine, cap=None)
    assert torch.equal(off, torch.ones(3, dtype=f64)) and not off.requires_grad


def test_logprob_gap_stats_hand_computed():
    learner = t64([[math.log(0.5), math.log(0.2), 0.0]])
    engine = t64([[math.log(0.25), math.log(0.2), -50.0]])  # masked-out gap of 50 is ignored
    stats = logprob_gap_stats(learner, engine, t64([[1.0, 1.0, 0.0]]))
    log2 = math.log(2.0)
    assert stats["max_abs"] == pytest.approx(log2)
    assert stats["mean_abs"] == pytest.approx(log2 / 2)
    # KL(engine || learner) from engine samples: exp(learner - engine) - (learner - engine) - 1
    assert stats["k3"] == pytest.approx((2.0 - log2 - 1.0) / 2)


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy


def reference_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 2, 100])
def test_token_logprobs_matches_log_softmax(temperature, chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 9, dtype=f64) * 3
    token_ids = torch.randint(9, (3, 4))
    result = token_logprobs(logits, token_ids, temperature, chunk_size)
    torch.testing.assert_close(result, reference_logprobs(logits, token_ids, temperature))


def test_token_logprobs_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    logits, token_ids = torch.randn(5, 3, 7), torch.randint(7, (5, 3))
    assert torch.equal(
        token_logprobs(logits, token_ids, chunk_size=1),
        token_logprobs(logits, token_ids, chunk_size=64),
    )


def test_token_logprobs_bf16_uses_float32_math():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 33) * 4).bfloat16()
    token_ids = torch.randint(33, (2, 5))
    result = token_logprobs(logits, token_ids, temperature=0.6)
    assert result.dtype == torch.float32
    expected = reference_logprobs(logits.float(), token_ids, 0.6).float()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_token_logprobs_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, dtype=f64, requires_grad=True)
    token_ids = torch.randint(5, (3, 2))
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs(x, token_ids, 0.7, chunk_size=2), (logits,)
    )

    upstream = torch.randn(3, 2, dtype=f64)
    (grad,) = torch.autograd.grad(
        (token_logprobs(logits, token_ids, 0.7, 2) * upstream).sum(), logits
    )
    (expected,) = torch.autograd.grad(
        (reference_logprobs(logits, token_ids, 0.7) * upstream).sum(), logits
    )
    torch.testing.assert_close(grad, expected)


def test_token_logprobs_bf16_gradient_keeps_logits_dtype():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 17).bfloat16().requires_grad_()
    token_ids = torch.randint(17, (2, 3))
    token_logprobs(logits, token_ids, chunk_size=1).sum().backward()
    reference = logits.detach().float().requires_grad_()
    reference_logprobs(reference, token_ids).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)


class LargestAllocations(TorchDispatchMode):
    """Records the largest tensor each op returns, per dtype."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.largest[leaf.dtype] = max(self.largest.get(leaf.dtype, 0), leaf.numel())
        return out


def test_token_logprobs_never_allocates_a_full_float32_copy():
    batch, length, vocab = 4, 3, 64
    logits = torch.randn(batch, length, vocab).bfloat16().requires_grad_()
    token_ids = torch.randint(vocab, (batch, length))

    with LargestAllocations() as probe:
        token_logprobs(logits, token_ids, temperature=0.8, chunk_size=1).sum().backward()
    assert probe.largest[torch.float32] <= length * vocab  # one chunk
    # The probe saw the backward too: the bf16 gradient is the only full-size tensor.
    assert probe.largest[torch.bfloat16] == batch * length * vocab

    # Nothing [B, T, V]-sized in float32 is kept alive for backward either: only the logsumexp.
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, token_ids, temperature=0.8, chunk_size=1)
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) == batch * length

    # Control: the naive way does allocate it, so the probe would catch a regression.
    with LargestAllocations() as probe:
        torch.log_softmax(logits.detach().float(), dim=-1)
    assert probe.largest[torch.float32] == batch * length * vocab


def reference_entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -torch.where(logp.isfinite(), logp.exp() * logp, 0.0).sum(dim=-1)  # a banned token adds 0


def test_token_entropy_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10, dtype=f64, requires_grad=True)
    entropy = token_entropy(logits, chunk_size=2)
    torch.testing.assert_close(entropy, reference_entropy(logits.detach()))
    assert torch.equal(entropy, token_entropy(logits, chunk_size=1))
    assert not entropy.requires_grad
    # Uniform over V gives log V.
    torch.testing.assert_close(
        token_entropy(torch.zeros(1, 1, 10, dtype=f64)), t64([[math.log(10)]])
    )


def test_token_entropy_handles_banned_tokens_and_bf16():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, dtype=f64)
    banned = logits.clone()
    banned[..., 0] = -torch.inf
    torch.testing.assert_close(token_entropy(banned), reference_entropy(logits[..., 1:]))
    half = token_entropy(logits.bfloat16())
    assert half.dtype == torch.float32  # float32 math, compared at float32 precision
    torch.testing.assert_close(half, reference_entropy(logits.bfloat16().float()).float())


def test_entropy_from_the_logprob_pass_is_the_sampled_distributions():
    """token_logprobs(with_entropy=True): the same log-probs and gradient as without, plus the
    entropy of softmax(logits / temperature), detached, banned tokens included."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=f64)
    logits[0, :, 2] = -torch.inf
    token_ids = torch.randint(3, 11, (3, 5))
    plain_in, fused_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain = token_logprobs(plain_in, token_ids, temperature=0.7, chunk_size=2)
    fused, entropy = token_logprobs(fused_in, token_ids, temperature=0.7, chunk_size=2, with_entropy=True)
    assert torch.equal(plain, fused) and not entropy.requires_grad
    torch.testing.assert_close(entropy, reference_entropy(logits / 0.7))
    upstream = torch.randn(3, 5, dtype=f64)
    (plain * upstream).sum().backward()
    (fused * upstream).sum().backward()
    assert torch.equal(plain_in.grad, fused_in.grad)


# ----------------------------------------------------------------------------------------------
# Aggregation


def test_aggregate_loss_hand_computed():
    per_token = t64([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, NAN, torch.inf]])  # padding is garbage
    mask = t64([[1, 1, 1, 0], [1, 0, 0, 0]])

    def agg(mode: str) -> float:
        return aggregate_loss(
            per_token, mask, LossNormalizer.from_mask(mode, mask, max_len=5)
        ).item()

    assert agg("seq_mean_token_mean") == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert agg("token_mean") == pytest.approx(10 / 4)
    assert agg("seq_mean_token_sum_norm") == pytest.approx(10 / (2 * 5))


def test_loss_normalizer_from_mask_and_validation():
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    normalizer = LossNormalizer.from_mask("token_mean", mask, max_len=8)
    assert (normalizer.num_sequences, normalizer.num_tokens, normalizer.max_len) == (3, 3, 8)
    with pytest.raises(ValueError, match="mode must be one of seq_mean_token_mean, token_mean"):
        LossNormalizer.from_mask("mean", mask, max_len=8)


# ----------------------------------------------------------------------------------------------
# Policy loss: values and metrics

RATIOS = [[1.5, 1.27, 0.5, 1.0], [0.5, 0.81, 1.5, 1.0]]
SEQ_ADVANTAGES = [1.0, -1.0]
# -min(r A, clip(r, 0.8, 1.28) A) for A = +1 and A = -1.
PG_LOSS = [[-1.28, -1.27, -0.5, -1.0], [0.8, 0.81, 1.5, 1.0]]


def clipping_case(requires_grad: bool = False) -> tuple[Tensor, Tensor]:
    logprobs = torch.full((2, 4), -1.3, dtype=f64, requires_grad=requires_grad)
    old_logprobs = logprobs.detach() - torch.log(t64(RATIOS))
    return logprobs, old_logprobs


def test_policy_loss_per_token_values_hand_computed():
    logprobs, old = clipping_case()
    ref = logprobs - math.log(2.0)
    is_weights = t64([[0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0]])
    beta, k3 = 0.1, 0.5 + math.log(2.0) - 1.0
    for row in range(2):
        for col in range(4):
            single = torch.zeros(2, 4, dtype=f64)
            single[row, col] = 1.0
            normalizer = LossNormalizer("token_mean", num_sequences=2, num_tokens=1, max_len=4)
            plain, _ = policy_loss(logprobs, old, t64(SEQ_ADVANTAGES), single, normalizer)
            assert plain.item() == pytest.approx(PG_LOSS[row][col])
            full, _ = policy_loss(
                logprobs,
                old,
                t64(SEQ_ADVANTAGES),
                single,
                normalizer,
                ref_logprobs=ref,
                beta=beta,
                is_weights=is_weights,
            )
            expected = is_weights[row, col].item() * PG_LOSS[row][col] + beta * k3
            assert full.item() == pytest.approx(expected)


def test_policy_loss_metrics_hand_computed():
    logprobs, old = clipping_case()
    mask = torch.ones(2, 4, dtype=f64)
    normalizer = LossNormalizer.from_mask("token_mean", mask, max_len=4)
    is_weights = t64([[0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0]])
    loss, metrics = policy_loss(
        logprobs,
        old,
        t64(SEQ_ADVANTAGES),
        mask,
        normalizer,
        ref_logprobs=logprobs - math.log(2.0),
        beta=0.1,
        is_weights=is_weights,
    )
    ratios = [r for row in RATIOS for r in row]
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 8)  # r = 0.5 with A < 0
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 8)  # r = 1.5 with A > 0
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / 8)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["approx_kl"].item() == pytest.approx(
        sum(r - math.log(r) - 1 for r in ratios) / 8
    )
    assert metrics["kl_ref"].item() == pytest.approx(0.5 + math.log(2.0) - 1.0)
    assert metrics["is_weight_mean"].item() == pytest.approx(8.5 / 8)
    assert metrics["is_weight_min"].item() == pytest.approx(0.5)
    assert all(not value.requires_grad for value in metrics.values())
    weighted_pg = (is_weights * t64(PG_LOSS)).sum().item()
    assert loss.item() == pytest.approx(weighted_pg / 8 + 0.1 * (0.5 + math.log(2.0) - 1.0))


def test_policy_loss_without_extras_reports_no_kl_or_is_metrics():
    logprobs, old = clipping_case()
    mask = torch.ones(2, 4, dtype=f64)
    _, metrics = policy_loss(
        logprobs, old, t64(SEQ_ADVANTAGES), mask, LossNormalizer.from_mask("token_mean", mask, 4)
    )
    assert "kl_ref" not in metrics and "is_weight_mean" not in metrics


# ----------------------------------------------------------------------------------------------
# Policy loss: gradients

VOCAB, HIDDEN = 11, 5
LENGTHS = [7, 2, 5, 1, 6, 3]  # uneven, so token counts differ between micro-batches
MAX_T = 7


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB)).double()


@dataclass
class Batch:
    inputs: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    is_weights: Tensor


def make_batch(model: nn.Module, spread: float = 0.3) -> Batch:
    generator = torch.Generator().manual_seed(1)
    size = (len(LENGTHS), MAX_T)
    inputs = torch.randint(VOCAB, size, generator=generator)
    targets = torch.randint(VOCAB, size, generator=generator)
    mask = torch.arange(MAX_T) < torch.tensor(LENGTHS).unsqueeze(-1)
    with torch.no_grad():
        logprobs = token_logprobs(model(inputs), targets)

    def jitter() -> Tensor:
        return spread * torch.randn(size, generator=generator, dtype=f64)

    # Spread old logprobs so that some ratios land outside the clip band.
    old_logprobs = logprobs + jitter()
    engine_logprobs = old_logprobs + jitter()
    return Batch(
        inputs=inputs,
        targets=targets,
        mask=mask,
        advantages=torch.randn(len(LENGTHS), generator=generator, dtype=f64),
        old_logprobs=old_logprobs,
        ref_logprobs=logprobs + jitter(),
        is_weights=truncated_is_weights(old_logprobs, engine_logprobs, cap=1.2),
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ratio_one_gradient_is_reinforce_with_baseline(mode):
    model = tiny_model()
    batch = make_batch(model)
    logits = model(batch.inputs)
    logits.retain_grad()
    logprobs = token_logprobs(logits, batch.targets, chunk_size=2)
    max_len = MAX_T + 3
    normalizer = LossNormalizer.from_mask(mode, batch.mask, max_len=max_len)
    loss, metrics = policy_loss(
        logprobs, logprobs.detach(), batch.advantages, batch.mask, normalizer
    )
    loss.backward()

    # Independently: grad of -A log p(token) w.r.t. logits is -A (onehot - softmax), each token
    # weighted as the normaliser weights it.
    mask = batch.mask.double()
    num_sequences = len(LENGTHS)
    token_weight = {
        "seq_mean_token_mean": mask / mask.sum(-1, keepdim=True) / num_sequences,
        "token_mean": mask / mask.sum(),
        "seq_mean_token_sum_norm": mask / (num_sequences * max_len),
    }[mode]
    probs = torch.softmax(logits.detach(), dim=-1)
    onehot = F.one_hot(batch.targets, VOCAB).double()
    expected = -(batch.advantages.unsqueeze(-1) * token_weight).unsqueeze(-1) * (onehot - probs)
    torch.testing.assert_close(logits.grad, expected)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_frac_low"].item() == metrics["clip_frac_high"].item() == 0.0


def test_clipping_zeroes_the_gradient_exactly_where_it_bites():
    logprobs, old = clipping_case(requires_grad=True)
    mask = torch.ones(2, 4, dtype=f64)
    loss, _ = policy_loss(
        logprobs, old, t64(SEQ_ADVANTAGES), mask, LossNormalizer.from_mask("token_mean", mask, 4)
    )
    loss.backward()
    grad = logprobs.grad
    # Clipped: A > 0 with r = 1.5 > 1.28, and A < 0 with r = 0.5 < 0.8.
    assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0
    # d(-r A)/d logp = -r A, over 8 tokens, everywhere else: just inside the band (1.27, 0.81),
    # A > 0 with r < 0.8 and A < 0 with r > 1.28 (the min picks the unclipped term), and r = 1.
    ratios, advantages = t64(RATIOS), t64(SEQ_ADVANTAGES).unsqueeze(-1)
    expected = -ratios * advantages / 8
    expected[0, 0] = expected[1, 0] = 0.0
    torch.testing.assert_close(grad, expected)
    assert (grad[:, 1:] != 0).all()


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_masked_tokens_get_exactly_zero_gradient(mode):
    model = tiny_model()
    batch = make_batch(model)
    padding = ~batch.mask
    # Garbage on padding must not leak into the loss or the gradients.
    old = batch.old_logprobs.masked_fill(padding, NAN)
    ref = batch.ref_logprobs.masked_fill(padding, -torch.inf)
    is_weights = batch.is_weights.masked_fill(padding, torch.inf)
    logits = model(batch.inputs)
    logits.retain_grad()
    loss, _ = policy_loss(
        token_logprobs(logits, batch.targets),
        old,
        batch.advantages,
        batch.mask,
        LossNormalizer.from_mask(mode, batch.mask, MAX_T),
        ref_logprobs=ref,
        beta=0.1,
        is_weights=is_weights,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[padding] == 0).all()
    assert (logits.grad[batch.mask].abs().sum(-1) > 0).all()


def accumulated_gradients(
    model: nn.Module,
    batch: Batch,
    mode: str,
    split: list[int],
    per_micro_batch_normalizer: bool = False,
) -> tuple[float, list[Tensor]]:
    """Sum of micro-batch losses and the accumulated parameter gradients."""
    model.zero_grad()
    full_normalizer = LossNormalizer.from_mask(mode, batch.mask, MAX_T)
    total_loss, start = 0.0, 0
    for size in split:
        rows = slice(start, start + size)
        start += size
        normalizer = full_normalizer
        if per_micro_batch_normalizer:
            normalizer = LossNormalizer.from_mask(mode, batch.mask[rows], MAX_T)
        logprobs = token_logprobs(model(batch.inputs[rows]), batch.targets[rows], chunk_size=2)
        loss, _ = policy_loss(
            logprobs,
            batch.old_logprobs[rows],
            batch.advantages[rows],
            batch.mask[rows],
            normalizer,
            ref_logprobs=batch.ref_logprobs[rows],
            beta=0.1,
            is_weights=batch.is_weights[rows],
        )
        if per_micro_batch_normalizer:
            loss = loss / len(split)  # the usual gradient-accumulation scaling
        loss.backward()
        total_loss += loss.item()
    return total_loss, [param.grad.clone() for param in model.parameters()]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradient_accumulation_invariance(mode):
    model = tiny_model()
    batch = make_batch(model)
    full_loss, full_grads = accumulated_gradients(model, batch, mode, [6])
    _, metrics = policy_loss(
        token_logprobs(model(batch.inputs), batch.targets),
        batch.old_logprobs,
        batch.advantages,
        batch.mask,
        LossNormalizer.from_mask(mode, batch.mask, MAX_T),
    )
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0  # clipping is exercised

    for split in ([3, 1, 2], [1, 4, 1]):
        micro_loss, micro_grads = accumulated_gradients(model, batch, mode, split)
        assert micro_loss == pytest.approx(full_loss, rel=1e-12)
        for full, micro in zip(full_grads, micro_grads, strict=True):
            assert torch.allclose(full, micro, rtol=1e-10, atol=1e-12)


def test_per_micro_batch_normalisation_breaks_invariance():
    model = tiny_model()
    batch = make_batch(model)
    _, full_grads = accumulated_gradients(model, batch, "token_mean", [6])
    _, naive_grads = accumulated_gradients(
        model, batch, "token_mean", [3, 1, 2], per_micro_batch_normalizer=True
    )
    assert not all(
        torch.allclose(full, naive, rtol=1e-6, atol=1e-8)
        for full, naive in zip(full_grads, naive_grads, strict=True)
    )
